"""The batched scorer against one-sentence-at-a-time fp32 references of BabyLM 2025's rule, on real BLiMP.

The reference (`official`) is written here from the pipeline's description, one item at a
time: tokenise the whole sentence with offsets, mark the tokens whose span ends after the
completion's first character, never score token 0, sum log p of the marked tokens from one
forward of the sentence.
"""

import json
import os
from copy import deepcopy

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlmerge.config import ModelConfig, TokenizerConfig, load_config
from vlmerge.data import FeatureTable
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.metrics import first_is_best
from vlmerge.evaluate.scoring import Scorer, completion_span
from vlmerge.evaluate.tasks import Request
from vlmerge.model import build_config, init_model
from vlmerge.precompute.tokenizer import train_bpe

from conftest import SMALL_WORLD

PARADIGMS = ["anaphor_number_agreement", "determiner_noun_agreement_2", "irregular_past_participle_verbs",
             "wh_questions_object_gap", "regular_plural_subject_verb_agreement_1", "npi_present_1"]


@pytest.fixture(scope="module")
def setup(small_prepared):
    cfg = load_config(None, [f"paths.root={small_prepared}", *SMALL_WORLD])
    tokenizer = AutoTokenizer.from_pretrained(cfg.layout.tokenizer_dir)
    features = FeatureTable(cfg.store_path)
    config = build_config(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                                      max_length=128), tokenizer, features.dim)
    return init_model(config, 3), tokenizer, features


def blimp_sentences(real_blimp, per_paradigm: int = 40) -> list[str]:
    out = []
    for uid in PARADIGMS:
        for line in (real_blimp / f"{uid}.jsonl").read_text().splitlines()[:per_paradigm]:
            row = json.loads(line)
            out += [row["sentence_good"], row["sentence_bad"]]
    return out


def official(model, tokenizer, sentence: str, completion: str, *, lead: str = "", bos: int | None = None,
             special: bool = True, pixel=None) -> float:
    """BabyLM's causal score of `completion` (the end of `sentence`), one item, fp32, from the full logits."""
    text = lead + sentence
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if bos is not None:
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    start = len(text) - len(completion) + (offsets[0][0] if special else 0)
    with torch.no_grad():
        kwargs = {"pixel_values": pixel} if pixel is not None else {}
        logp = model(input_ids=torch.tensor([ids]), **kwargs).logits.float().log_softmax(-1)[0]
    return sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)) if offsets[i][1] > start)


def test_takmaz2025_scores_equal_one_at_a_time_on_real_blimp(setup, real_blimp):
    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp)
    scorer = Scorer(model, tokenizer, features=features, batch_size=32)
    assert scorer.prompt == "takmaz2025"  # auto, for a model with an image token
    got = scorer.score([Request(s, group=i // 2) for i, s in enumerate(sentences)])
    for i, s in enumerate(sentences):
        want = official(model, tokenizer, s, s, lead="<image> ", bos=tokenizer.bos_token_id, special=False,
                        pixel=features.null[None])
        assert got.logprob[i] == pytest.approx(want, abs=1e-4)


def test_completion_span_straddling_one_token_and_empty(setup):
    model, tokenizer, features = setup
    scorer = Scorer(model, tokenizer, features=features)
    image = str(features.index[5])
    cases = [("The cat sat.", " on the mat."),  # EWoK-like: " " + target after a context
             ("The ca", "t sat."),              # the completion starts inside the token " cat": it is scored
             ("What colour is it?", " red"),    # a completion of one token
             ]
    reqs = [Request(t, context=c) for c, t in cases] + [Request(" red", context="What colour is it?", image=image)]
    r = scorer.score(reqs)
    for k, (c, t) in enumerate(cases):
        want = official(model, tokenizer, c + t, t, lead="<image> ", bos=tokenizer.bos_token_id, special=False,
                        pixel=features.null[None])
        assert r.logprob[k] == pytest.approx(want, abs=1e-4)
    assert r.logprob[3] != pytest.approx(r.logprob[2], abs=1e-6)  # the image matters
    # the rule itself: token 0 is never scored; tokens ending after the start are; none is a valid answer
    assert completion_span([(0, 3), (3, 7), (7, 11)], 5) == (1, 3)
    assert completion_span([(0, 3), (3, 7), (7, 11)], 0) == (1, 3)
    assert completion_span([(0, 3)], 0) == (1, 1)
    assert completion_span([(0, 3), (3, 7), (0, 0)], 4) == (1, 2)  # a trailing special token is not scored
    with pytest.raises(VlmergeError, match="not one run"):
        completion_span([(0, 3), (3, 7), (0, 0), (7, 9)], 4)


def test_bf16_decisions_mostly_agree_with_fp32(setup, real_blimp):
    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp)
    reqs = [Request(s, group=i // 2) for i, s in enumerate(sentences)]
    fp32 = Scorer(model, tokenizer, features=features).score(reqs).logprob
    copy = deepcopy(model)  # a bf16 scorer casts the model's weights in place
    bf16 = Scorer(copy, tokenizer, features=features, dtype="bf16").score(reqs).logprob
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    agree = ((fp32[0::2] > fp32[1::2]) == (bf16[0::2] > bf16[1::2])).mean()
    assert agree >= 0.9 and abs(bf16 - fp32).max() < 1.0


def test_legacy_prompt_scores_every_target_token_after_bos(setup, real_blimp):
    _, tokenizer, _ = setup
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    sentences = blimp_sentences(real_blimp, 5)
    got = Scorer(lm, tokenizer, prompt="legacy").score([Request(s) for s in sentences])
    for i, s in enumerate(sentences):
        want = official(lm, tokenizer, s, s, bos=tokenizer.bos_token_id, special=False)
        assert got.logprob[i] == pytest.approx(want, abs=1e-4)
    with pytest.raises(VlmergeError, match="takmaz2025 needs a model with an image token"):
        Scorer(lm, tokenizer, prompt="takmaz2025")


# --- the official rule on all 67 BLiMP paradigms, a small trained Llama whose tokenizer adds no BOS ---------------

# The first 3 pairs of every paradigm (201), plus BLiMP's 7 identical-sentence pairs (ties);
# VLMERGE_PARITY_PAIRS=all checks every one of the 67,000 pairs (5 minutes on 2 cores).
PER_PARADIGM = 1000 if os.environ.get("VLMERGE_PARITY_PAIRS") == "all" else 3


@pytest.fixture(scope="module")
def trained_llama(real_blimp):
    """A 2-layer Llama trained for a few seconds on BLiMP's good sentences; its BPE adds no BOS."""
    rows = {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in sorted(real_blimp.glob("*.jsonl"))}
    sentences = [s for rs in rows.values() for r in rs[:150] for s in (r["sentence_good"], r["sentence_bad"])]
    tok = train_bpe(sentences, TokenizerConfig(vocab_size=3000), progress=False)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    ids = tok(sentences[0::2], add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        batch = [ids[i] for i in rng.integers(0, len(ids), 32)]
        width = max(map(len, batch))
        x = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for r, seq in enumerate(batch):
            x[r, : len(seq)] = labels[r, : len(seq)] = torch.tensor(seq)
        lm(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    pairs = [(r["sentence_good"], r["sentence_bad"]) for rs in rows.values()
             for k, r in enumerate(rs) if k < PER_PARADIGM or r["sentence_good"] == r["sentence_bad"]]
    return lm.eval(), tok, pairs, len(rows)


@pytest.mark.slow  # trains a small Llama (about 30 s on 2 cores)
def test_official_rule_on_all_67_blimp_paradigms_equals_one_pair_at_a_time(trained_llama):
    lm, tok, pairs, paradigms = trained_llama
    assert paradigms == 67 and tok("The cat.")["input_ids"][0] != tok.bos_token_id  # no BOS from this tokenizer
    scorer = Scorer(lm, tok, batch_size=64)
    assert scorer.prompt == "text"
    got = scorer.score([Request(s, group=i // 2) for i, s in enumerate(s for p in pairs for s in p)]).logprob
    want = np.array([official(lm, tok, s, s) for p in pairs for s in p])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ours, ref = first_is_best(got, [2] * len(pairs)), want[0::2] >= want[1::2]
    assert (ours == ref).all()
    ties = [k for k, (g, b) in enumerate(pairs) if g == b]
    assert len(ties) == 7 and ours[ties].all()  # identical sentences: a tie, counted correct
    # a completion that starts inside a token (" senator" after "The sen"): that token is scored
    assert len(tok(" senator was")["input_ids"]) == 2 and len(tok("The")["input_ids"]) == 1
    straddle = scorer.score([Request("ator was", context="The sen"), Request(" was", context="The senator")])
    assert straddle.tokens.tolist() == [2, 1]
    assert straddle.logprob[0] == pytest.approx(official(lm, tok, "The senator was", "ator was"), abs=1e-5)
    # the earlier rule (BOS first, every token scored) decides differently on some pairs
    legacy = Scorer(lm, tok, prompt="legacy").score([Request(s) for p in pairs for s in p]).logprob
    assert (first_is_best(legacy, [2] * len(pairs)) != ref).any()
