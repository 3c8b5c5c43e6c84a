import json
import re
from pathlib import Path

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


def test_nul_bytes_and_invalid_utf8_are_counted_problems_left_out_of_the_corpus(make_cfg, tmp_path, capsys):
    text = tmp_path / "t.train"
    text.write_bytes(b"the cat sat .\nthe \x00dog ran .\na caf\xe9 line .\nthe bird flew .\n")
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image_id": "a", "caption": "a red circle ."}\n{"image_id": "b", "caption": "a \\u0000 square"}\n')
    cfg = make_cfg(f"data.text=['{text}']", f"data.captions=['{caps}']")
    tokenizer.run(cfg, progress=False)
    corpus.run(cfg)
    err = capsys.readouterr().err
    assert "t.train:2: malformed line: holds a NUL byte" in err and "t.train:3: malformed line: not UTF-8" in err
    assert "caps.jsonl:2: malformed line: holds a NUL byte" in err
    shards = TokenShards(cfg.layout.corpus_source_dir("text"))
    assert len(shards) == 2 and shards.index["words"] == 8
    assert len(TokenShards(cfg.layout.corpus_source_dir("captions"))) == 1


def test_a_tokenizer_without_the_image_token_is_refused(tmp_path):
    tc = TokenizerConfig(vocab_size=300)
    tok = train_bpe(["a red circle ."] * 20, tc, progress=False)
    tok.save_pretrained(tmp_path)
    with pytest.raises(VlmergeError, match="has no '<vision>' token"):
        load_tokenizer(tmp_path, TokenizerConfig(vocab_size=300, image_token="<vision>"))


def test_missing_text_file_is_one_clear_error(make_cfg):
    with pytest.raises(VlmergeError, match="data.text: /nonexistent/\\*.train: no such file"):
        tokenizer.run(make_cfg("data.text=['/nonexistent/*.train']"), progress=False)


def test_split_rows_pair_a_datasets_files_by_name_and_add_them_up():
    from vlmerge.precompute.corpus import dataset_key, format_split_table, split_rows

    def c(path, samples, words=0):
        return {"path": path, "samples": samples, "words": words}

    assert [dataset_key(p) for p in ("/d/bnc_spoken.train", "bnc_spoken.dev", "cc3m_train.jsonl", "CC3M-val.jsonl",
                                     "train.txt", "dev.txt", "ln.dev.jsonl", "contest.train")] == \
           ["bnc_spoken", "bnc_spoken", "cc3m", "cc3m", "", "", "ln", "contest"]
    train = [c("/t/bnc_spoken.train", 100, 1000), c("/t/childes.train", 3000, 20000), c("/t/gutenberg.train", 50, 500)]
    val = [c("/v/childes.dev", 200), c("/v/switchboard.dev", 7), c("/v/bnc_spoken.dev", 5)]
    assert split_rows("text", train, val) == [
        ("bnc_spoken.train", 100, 5, 1000),
        ("childes.train", 3000, 200, 20000),
        ("gutenberg.train", 50, None, 500),
        ("switchboard.dev", None, 7, None),
        ("text, all files", 3150, 212, 21500),
    ]
    # One file a side: no total row; no validation files: '-'; an index without per-file counts: its totals.
    assert split_rows("captions", [c("cc3m_train.jsonl", 9, 90)], [c("cc3m_val.jsonl", 1)]) == \
           [("cc3m_train.jsonl", 9, 1, 90)]
    assert split_rows("captions", [c("a.jsonl", 9, 90), c("b.jsonl", 1, 5)], []) == \
           [("a.jsonl", 9, None, 90), ("b.jsonl", 1, None, 5), ("captions, all files", 10, None, 95)]
    assert split_rows("text", None, [c("x.dev", 3), c("y.dev", 4)], {"samples": 70, "words": 700}) == \
           [("text, all files", 70, 7, 700)]
    table = format_split_table([("BabyLM text", 5_492_930, 289_102, 50_000_000), ("cc3m", 2_061_837, None, 25_000)])
    assert table.splitlines() == [
        "dataset      train sentences  val sentences  val share (%)  train words",
        "BabyLM text        5,492,930        289,102            5.0   50,000,000",
        "cc3m               2,061,837              -              -       25,000",
    ]


def _split_table(printed: str) -> dict[str, list[str]]:
    """The printed split table: dataset -> its other columns."""
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("dataset "))
    assert lines[head].split("  ")[0].strip() == "dataset" and "val share (%)" in lines[head]
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[head + 1:])}


def test_corpus_prints_each_datasets_split_and_keeps_per_file_counts(make_cfg, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "childes.train").write_text("the cat sat .\n\n  a dog  runs\nhere it is now .\n" * 10)  # 30 lines, 120 words
    (d / "bnc_spoken.train").write_text("yes .\nno it is not .\n" * 5)  # 10 lines, 35 words
    (d / "childes.dev").write_text("the dog sat .\n\nhere .\n")  # 2 lines
    (d / "switchboard.dev").write_text("uh huh .\n")  # 1 line, no training file
    (d / "cc3m_train.jsonl").write_text(
        "".join(json.dumps({"image_id": f"i{i}", "caption": "a red circle is here ."}) + "\n" for i in range(12))
        + '{"image_id": "bad"}\n')  # 12 valid lines of 6 words, 1 malformed
    (d / "cc3m_val.jsonl").write_text(
        "".join(json.dumps({"image_id": f"v{i}", "caption": "two blue squares ."}) + "\n" for i in range(3)))
    cfg = make_cfg(f"data.text=['{d}/childes.train', '{d}/bnc_spoken.train']",
                   f"data.dev_text=['{d}/*.dev']", f"data.captions=['{d}/cc3m_train.jsonl']",
                   f"data.dev_captions=['{d}/cc3m_val.jsonl']", "tokenizer.vocab_size=300")
    tokenizer.run(cfg, progress=False)
    capsys.readouterr()
    corpus.run(cfg)
    want = {
        "childes.train": ["30", "2", "6.2", "120"],
        "bnc_spoken.train": ["10", "-", "-", "35"],
        "switchboard.dev": ["-", "1", "-", "-"],
        "text, all files": ["40", "3", "7.0", "155"],
        "cc3m_train.jsonl": ["12", "3", "20.0", "72"],
    }
    assert _split_table(capsys.readouterr().out) == want
    for source, files in [("text", [("childes.train", 30, 120), ("bnc_spoken.train", 10, 35)]),
                          ("captions", [("cc3m_train.jsonl", 12, 72)])]:
        shards = TokenShards(cfg.layout.corpus_source_dir(source))
        index = shards.index
        assert [(Path(f["path"]).name, f["samples"], f["words"]) for f in index["files"]] == files
        assert sum(f["samples"] for f in index["files"]) == index["samples"] == len(shards)
        assert sum(f["words"] for f in index["files"]) == index["words"] == int(shards.words().sum())
    # Up to date: the same table from the index; an index from before per-file counts: its totals.
    corpus.run(cfg)
    assert _split_table(capsys.readouterr().out) == want
    index_file = cfg.layout.corpus_source_dir("text") / "index.json"
    index = json.loads(index_file.read_text())
    del index["files"]
    index_file.write_text(json.dumps(index))
    corpus.run(cfg)
    printed = capsys.readouterr().out
    assert "corpus: " + str(index_file.parent) + " is up to date" in printed
    assert _split_table(printed) == {"text, all files": ["40", "3", "7.0", "155"],
                                     "cc3m_train.jsonl": ["12", "3", "20.0", "72"]}


def test_a_missing_validation_file_is_one_clear_error_before_any_work(make_cfg):
    cfg = make_cfg("data.dev_captions=['/nonexistent/val.jsonl']")
    tokenizer.run(cfg, progress=False)
    with pytest.raises(VlmergeError, match="data.dev_captions: /nonexistent/val.jsonl: no such file"):
        corpus.run(cfg)
    assert not cfg.layout.corpus_dir.exists()


def test_no_dev_captions_leaves_the_data_section_as_it_was(make_cfg):
    # Run fingerprints hold the data section: configs without dev_captions keep theirs.
    assert list(make_cfg().data.model_dump()) == ["text", "dev_text", "captions"]
    assert make_cfg("data.dev_captions=['v.jsonl']").data.model_dump()["dev_captions"] == ["v.jsonl"]
