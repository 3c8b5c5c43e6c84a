import json

import pytest

from vlmerge.precompute import corpus, tokenizer
from vlmerge.precompute.corpus import TokenShards
from vlmerge.precompute.tokenizer import load_tokenizer, train_bpe
from vlmerge.config import TokenizerConfig
from vlmerge.errors import VlmergeError


@pytest.fixture
def built(make_cfg, demo_world, capsys):
    cfg = make_cfg()
    tok_dir = tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    return cfg, tok_dir, capsys.readouterr().out


def test_tokenizer_has_the_special_tokens_and_reports_subwords_per_word(built):
    cfg, tok_dir, printed = built
    tok = load_tokenizer(tok_dir, cfg.tokenizer)
    for t in ("<image>", "<s>", "</s>", "<pad>"):
        assert t in tok.get_vocab()
    assert tok.image_token == "<image>" and tok.bos_token == "<s>" and tok.pad_token == "<pad>"
    assert len(tok) <= cfg.tokenizer.vocab_size
    stats = json.loads((tok_dir / "stats.json").read_text())
    assert 1.0 <= stats["subword_tokens_per_word"] < 2.0
    assert f"{stats['subword_tokens_per_word']:.3f} subword tokens per word" in printed
    # A sentence's first word is the same token as anywhere else (prefix space).
    assert tok("cat")["input_ids"] == tok("the cat")["input_ids"][-len(tok("cat")["input_ids"]):]
    assert (tok_dir / "config.yaml").is_file()


def test_rerun_skips_finished_work(built):
    cfg, tok_dir, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in [*tok_dir.iterdir(), *(cfg.layout.corpus_dir).rglob("*.npy")]}
    tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_text_shards_keep_every_line_and_its_exact_word_count(built, demo_world):
    cfg, tok_dir, _ = built
    tok = load_tokenizer(tok_dir, cfg.tokenizer)
    lines = [l.strip() for l in demo_world.text_train.read_text().splitlines() if l.strip()]
    shards = TokenShards(cfg.layout.corpus_source_dir("text"))
    assert len(shards) == len(lines)
    assert shards.index["words"] == sum(len(l.split()) for l in lines) == demo_world.words
    for i in (0, 1, len(lines) // 2, len(lines) - 1):
        ids, words, image, _ = shards[i]
        assert tok.decode(list(ids)).strip() == lines[i]
        assert words == len(lines[i].split()) and image is None


def test_caption_shards_carry_their_image_ids(built, demo_world):
    cfg, _, _ = built
    rows = [json.loads(l) for l in (demo_world.root / "captions.jsonl").read_text().splitlines()]
    shards = TokenShards(cfg.layout.corpus_source_dir("captions"))
    assert len(shards) == len(rows)
    assert [shards[i][2] for i in (0, len(rows) - 1)] == [rows[0]["image_id"], rows[-1]["image_id"]]
    assert shards.index["words"] == sum(len(r["caption"].split()) for r in rows)


@pytest.mark.parametrize("recipe", ["bytelevel", "llava_bpe"])
def test_a_sample_splits_at_any_word_into_that_words_own_tokens(make_cfg, demo_world, recipe):
    # Training splits a sample where a scheduled word count falls: the piece must be exactly the tokens
    # of its words, whatever the tokenizer marks (byte-level 'Ġ', or nothing after a BERT pre-tokenizer).
    import numpy as np

    from vlmerge.data import Piece, piece_tokens

    cfg = make_cfg(f"tokenizer.recipe={recipe}", "tokenizer.vocab_size=400")
    tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    tok = load_tokenizer(cfg.layout.tokenizer_dir, cfg.tokenizer)
    lines = [l.strip() for l in demo_world.text_train.read_text().splitlines() if l.strip()]
    shards = TokenShards(cfg.layout.corpus_source_dir("text"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(lines), 200, replace=False):
        ids, n, _, starts = shards[int(i)]
        words = lines[i].split()
        assert n == len(words) == starts.sum()
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        own = tok(" ".join(words[a:b]), add_special_tokens=False)["input_ids"]
        assert piece_tokens(np.asarray(ids), Piece(0, a, b), n, np.asarray(starts)).tolist() == own, (lines[i], a, b)


def test_the_papers_recipe_splits_at_punctuation_and_knows_an_unknown_token(tmp_path):
    tc = TokenizerConfig(recipe="llava_bpe", vocab_size=300)
    tok = train_bpe(["the red circle is here ."] * 50, tc, progress=False)
    assert tok.unk_token == "<unk>" and "<unk>" in tok.get_vocab() and "<image>" in tok.get_vocab()
    pieces = tok.convert_ids_to_tokens(tok("here.", add_special_tokens=False)["input_ids"])
    assert pieces[-1] == "." and not any("Ġ" in p for p in pieces)
    assert tok.convert_ids_to_tokens(tok("é", add_special_tokens=False)["input_ids"]) == ["<unk>"]


def test_small_shards_split_the_corpus(make_cfg):
    cfg = make_cfg("corpus.shard_samples=1000")
    tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    shards = TokenShards(cfg.layout.corpus_source_dir("captions"))
    assert len(shards.index["shards"]) > 1
    assert len(shards) == sum(s["samples"] for s in shards.index["shards"])
    assert shards[999][2] != shards[1000][2]


def test_malformed_caption_lines_are_counted_not_fatal(make_cfg, tmp_path, capsys):
    m = tmp_path / "caps.jsonl"
    m.write_text('{"image_id": "a", "caption": "a red circle ."}\nnot json\n{"image_id": "b"}\n'
                 '{"image_id": "c", "caption": "two blue squares are here ."}\n')
    cfg = make_cfg(f"data.captions=['{m}']")
    tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    err = capsys.readouterr().err
    assert "caps.jsonl:2: malformed line" in err and "caps.jsonl:3: malformed line" in err
    assert len(TokenShards(cfg.layout.corpus_source_dir("captions"))) == 2


def test_a_tokenizer_without_the_image_token_is_refused(tmp_path):
    tc = TokenizerConfig(vocab_size=300)
    tok = train_bpe(["a red circle ."] * 20, tc, progress=False)
    tok.save_pretrained(tmp_path)
    with pytest.raises(VlmergeError, match="has no '<vision>' token"):
        load_tokenizer(tmp_path, TokenizerConfig(vocab_size=300, image_token="<vision>"))


def test_missing_text_file_is_one_clear_error(make_cfg):
    with pytest.raises(VlmergeError, match="data.text: /nonexistent/\\*.train: no such file"):
        tokenizer.run(make_cfg("data.text=['/nonexistent/*.train']"), progress=False)
