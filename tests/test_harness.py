"""`vlmerge eval --harness`: lm-evaluation-harness tasks scored by our Scorer, offline.

A tiny local harness task set (a YAML and a JSONL each, in tmp_path): BLiMP-like minimal pairs
(multiple_choice) and whole texts (loglikelihood_rolling). Run (a) through the CLI on a tiny causal
LM saved to disk and (b) on a merge of two tiny multimodal models held in memory (PairMerger, as the
sweep does); every log-likelihood lm-eval logged must be the Scorer's score of the same strings.
"""

import json
import random
import socket

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmerge.config import ModelConfig, TokenizerConfig, load_config
from vlmerge.data import FeatureTable
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.run import config_scorer, harness_command
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request
from vlmerge.merge.core import Pair, PairMerger
from vlmerge.model import build_config, init_model
from vlmerge.modelkey import ModelKey
from vlmerge.precompute.tokenizer import train_bpe

from conftest import vlmerge_cli

PAIRS = [("The cat sleeps.", "The cat sleep."), ("Many dogs bark.", "Many dogs barks."),
         ("She has eaten.", "She has ate."), ("The boys like the girl.", "The boys likes the girl."),
         ("Who did you see?", "Who did you see him?"), ("No dog ever barked.", "A dog ever barked.")]
TEXTS = ["The cat sleeps on the mat.", "Many dogs bark at night and the boys like the girl.",
         # longer than the models' max length (32 tokens): scored in rolling windows
         " ".join(["the dog saw the cat and the cat saw the dog"] * 6)]
MAX_LENGTH = 32

BLIMP_YAML = """task: tiny_blimp
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: ''
target_delimiter: ''
doc_to_target: 0
doc_to_choice: '{{{{[sentence_good, sentence_bad]}}}}'
num_fewshot: 0
metric_list:
- metric: acc
  aggregation: mean
  higher_is_better: true
metadata:
  version: 1.0
"""
ROLLING_YAML = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ''
doc_to_target: '{{{{text}}}}'
metric_list:
- metric: word_perplexity
- metric: bits_per_byte
metadata:
  version: 1.0
"""

# A task whose data would come from the Hub: refused offline, never fetched.
HUB_YAML = """task: hub_text
dataset_path: vlmerge-tests/no-such-dataset
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ''
doc_to_target: '{{text}}'
"""


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """lm-eval's `datasets` caches the task data in the test's folder, not the home folder."""
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))  # the CLI's process
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness_tasks")
    (folder / "blimp.jsonl").write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b}) + "\n"
                                                for g, b in PAIRS))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "tiny_blimp.yaml").write_text(BLIMP_YAML.format(data=folder / "blimp.jsonl"))
    (folder / "tiny_text.yaml").write_text(ROLLING_YAML.format(data=folder / "text.jsonl"))
    (folder / "hub_text.yaml").write_text(HUB_YAML)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    lines = [s for pair in PAIRS for s in pair] + TEXTS
    return train_bpe(lines * 20, TokenizerConfig(vocab_size=300, min_frequency=1), progress=False)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory, tokenizer):
    """A tiny Llama and its tokenizer (no BOS added: the first token is never scored), saved."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=MAX_LENGTH)).eval()
    path = tmp_path_factory.mktemp("lm") / "lm"
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tokenizer):
    """Two tiny multimodal models merged in memory at α = 0.5 (the sweep's PairMerger), a feature store."""
    root = tmp_path_factory.mktemp("mm")
    config = build_config(ModelConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                      max_length=MAX_LENGTH), tokenizer, 16)
    for name, seed in (("text", 1), ("mm", 2)):
        init_model(config, seed).save_pretrained(root / name)
    model = init_model(config, 1)
    PairMerger(Pair.open(root / "text", root / "mm")).merge_into(model, "linear", 0.5)
    with h5py.File(root / "features.h5", "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
        f["null_feature"] = np.full(16, 0.1, dtype=np.float32)
        f["image_ids"] = ["a", "b"]
    return model, FeatureTable(root / "features.h5")


def logged(out) -> dict[str, list[dict]]:
    """The samples lm-eval logged, per task."""
    return {t: [json.loads(line) for line in (out / "harness" / f"samples_{t}.jsonl").read_text().splitlines()]
            for t in ("tiny_blimp", "tiny_text")}


def direct(scorer: Scorer, ids: list[int], n: int) -> float:
    """Σ log p of the last `n` tokens of `ids` from one plain forward of the scorer's model (the null image)."""
    kwargs = {"pixel_values": scorer.features.null[None]} if scorer.use_image else {}
    with torch.no_grad():
        logp = scorer.model(input_ids=torch.tensor([ids]), **kwargs).logits.float().log_softmax(-1)[0]
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))


def check_against_scorer(samples: dict[str, list[dict]], scorer: Scorer, max_length: int) -> None:
    """Every logged log-likelihood is the Scorer's score of the same strings (a long text: its windows)."""
    from vlmerge.evaluate.harness import rolling_windows

    blimp = sorted(samples["tiny_blimp"], key=lambda s: s["doc_id"])
    assert [s["doc"]["sentence_good"] for s in blimp] == [g for g, _ in PAIRS]
    got = np.array([[r[0][0] for r in s["resps"]] for s in blimp])  # [pair, candidate]
    greedy = [[r[0][1] for r in s["resps"]] for s in blimp]
    assert [[a[1] for a in s["arguments"]] for s in blimp] == [[s["doc"]["sentence_good"], s["doc"]["sentence_bad"]]
                                                                 for s in blimp]
    want = scorer.score([Request(x) for pair in PAIRS for x in pair]).logprob.reshape(-1, 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert all(isinstance(g, bool) for row in greedy for g in row)
    assert [s["acc"] for s in blimp] == [float(g >= b) for g, b in want]

    text = sorted(samples["tiny_text"], key=lambda s: s["doc_id"])
    got = np.array([s["resps"][0][0] for s in text])
    want = scorer.score([Request(t) for t in TEXTS]).logprob
    np.testing.assert_allclose(got[:2], want[:2], atol=1e-5, rtol=0)  # texts that fit: the Scorer's score itself
    assert max(len(ids) for ids in scorer.sequences([Request(t) for t in TEXTS[:2]])[0]) <= max_length
    # the long text: the sum over its rolling windows, each scored by a plain forward
    (long_ids,), (scored,), _ = scorer.sequences([Request(TEXTS[2])])
    (prompt,), _, _ = scorer.sequences([Request("")])
    windows = rolling_windows(long_ids, scored, prompt, max_length)
    assert len(long_ids) > max_length and len(windows) == 3
    assert got[2] == pytest.approx(sum(direct(scorer, ids, n) for ids, n in windows), abs=1e-4)
    assert got[2] != pytest.approx(want[2], abs=1e-3)  # not the whole text at positions past the max length


def check_files(out, key_columns: dict) -> None:
    """lm-eval's results.json, and our Parquet rows of its metrics (task harness/<task>) and per-document acc."""
    results = json.loads((out / "harness" / "results.json").read_text())
    assert set(results["results"]) == {"tiny_blimp", "tiny_text"} and "samples" not in results
    assert results["n-samples"]["tiny_blimp"]["effective"] == len(PAIRS)
    rows = pd.read_parquet(out / "results.parquet")
    assert set(rows.task) == {"harness/tiny_blimp", "harness/tiny_text"}
    blimp = rows[rows.task == "harness/tiny_blimp"].set_index("metric")
    assert blimp.loc["acc", "value"] == pytest.approx(results["results"]["tiny_blimp"]["acc,none"])
    assert blimp.loc["acc", "n"] == len(PAIRS) and set(blimp.index) == {"acc", "acc_stderr"}
    assert set(rows[rows.task == "harness/tiny_text"].metric) == {"word_perplexity", "bits_per_byte"}  # no N/A stderr
    for column, value in key_columns.items():
        assert (rows[column] == value).all()
    items = pd.read_parquet(out / "items.parquet")
    assert sorted(items[items.task == "harness/tiny_blimp"].example_id.astype(int)) == list(range(len(PAIRS)))
    assert not (items.task == "harness/tiny_text").any()  # a rolling sample's value is a pair, not a number


@pytest.mark.slow  # two lm-eval runs, one in a subprocess (about 30 s on 2 cores)
def test_harness_cli_on_a_causal_lm_equals_the_scorer(tmp_path, tasks, causal_lm):
    out = tmp_path / "eval"
    r = vlmerge_cli("eval", "--model", str(causal_lm), "--harness", "tiny_blimp,tiny_text", "--harness-include",
                    str(tasks), "--out", str(out), f"paths.root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "harness/tiny_blimp" in r.stdout
    from vlmerge.evaluate.run import load_model

    model, tokenizer = load_model(causal_lm)
    scorer = Scorer(model, tokenizer)
    assert scorer.prompt == "text"
    check_against_scorer(logged(out), scorer, MAX_LENGTH)
    check_files(out, {"text_run": causal_lm.name, "method": "none"})


@pytest.mark.slow
def test_harness_on_a_merge_held_in_memory_uses_the_image_prompt(tmp_path, tasks, merged, tokenizer):
    model, features = merged
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    key = ModelKey(text_run="text", mm_run="mm", method="linear", alpha=0.5)
    out = tmp_path / "eval"
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: E731
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    want = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    results = harness_command(cfg, model, ["tiny_blimp", "tiny_text"], out=out, include_path=[tasks],
                              tokenizer=tokenizer, features=features, key=key)
    assert draws() == want  # lm-eval seeds the generators; the caller's are given back
    assert results["results"]["tiny_blimp"]["acc,none"] >= 0
    scorer = config_scorer(cfg, model, tokenizer, features)
    assert scorer.prompt == "takmaz2025" and scorer.use_image  # "<image> " + text, the null feature
    check_against_scorer(logged(out), scorer, MAX_LENGTH)
    check_files(out, {"mm_run": "mm", "method": "linear", "alpha": 0.5})


def test_rolling_windows_score_each_token_once_within_the_max_length():
    from vlmerge.evaluate.harness import rolling_windows

    seq = [1, 9, 8] + list(range(100, 140))  # BOS, image token, a lead token; 40 scored tokens
    prompt = [1, 9, 7]  # the empty text's sequence: BOS, image token, its own lead token
    windows = rolling_windows(seq, 40, prompt, 16)
    assert windows[0] == (seq[:16], 13)  # the sequence itself, cut short
    scored = [t for ids, n in windows for t in ids[len(ids) - n:]]
    assert scored == seq[3:]  # every scored token once, in order
    assert all(len(ids) <= 16 and ids[:2] == [1, 9] for ids, _ in windows)  # each headed by BOS and the image
    assert all(ids[2] != 8 for ids, _ in windows[1:])  # …not by the text's own lead
    assert rolling_windows(seq, 40, prompt, len(seq)) == [(seq, 40)]
    with pytest.raises(VlmergeError, match="no room"):
        rolling_windows(seq, 40, prompt, 3)


def test_is_greedy_is_computed(causal_lm):
    from lm_eval.api.instance import Instance

    from vlmerge.evaluate.harness import VlmergeLM
    from vlmerge.evaluate.run import load_model

    model, tokenizer = load_model(causal_lm)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the argmax is token 0 (<pad>) everywhere
    assert tokenizer.convert_ids_to_tokens(0) == "<pad>"
    lm = VlmergeLM(Scorer(model, tokenizer))
    pairs = [("<pad>", "<pad><pad>"), ("The cat", " sleeps."), ("The cat", " sleeps<pad>")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0, ("t", k, 1)) for k, pair in enumerate(pairs)])
    log_v = np.log(len(tokenizer))
    assert got[0] == (pytest.approx(-2 * log_v), True)
    assert got[1][1] is False and got[2][1] is False  # tokens other than <pad>: not greedy


def test_harness_refusals(tmp_path, tasks, causal_lm, monkeypatch):
    from vlmerge.evaluate.harness import VlmergeLM, run_tasks
    from vlmerge.evaluate.run import load_model

    model, tokenizer = load_model(causal_lm)
    lm = VlmergeLM(Scorer(model, tokenizer))
    with pytest.raises(VlmergeError, match="generation tasks"):
        lm.generate_until([])
    with pytest.raises(VlmergeError, match="no such lm-eval task"):
        run_tasks(lm, ["tiny_nonesuch"], [tasks])
    connects = []

    def connect(sock, address):
        connects.append(address)
        raise OSError("the test allows no connection")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(VlmergeError, match="nothing is downloaded"):
        run_tasks(lm, ["hub_text"], [tasks])
    assert connects == []  # offline: refused before any connection was tried
    r = vlmerge_cli("eval", "--model", str(causal_lm), "--harness", "tiny_blimp", "--task", "blimp",
                    "--out", str(tmp_path / "x"), f"paths.root={tmp_path}")
    assert r.returncode != 0 and "--harness runs lm-eval's tasks alone" in r.stderr
