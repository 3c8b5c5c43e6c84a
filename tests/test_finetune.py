"""BabyLM 2025's (Super)GLUE fine-tuning (`vlmerge finetune`) against the official pipeline's rules.

The references are written here, one item at a time, from evaluation_pipeline/finetune/ (dataset.py
`Dataset.load_file` and `collate_function`, utils.py `cosine_schedule_with_warmup`, trainer.py's
scikit-learn metrics, run.py's results.txt and predictions.json) and eval_finetuning.sh's recipes;
nothing is taken from the code under test. Fixture files are written in the official
`glue_filtered/<task>.{train,valid}.jsonl` format, with a line longer than `max_length`.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import processors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vlmerge.cli import main
from vlmerge.config import FinetuneConfig, TokenizerConfig, load_config
from vlmerge.finetune import classifier, loop, metrics
from vlmerge.finetune.run import recipe
from vlmerge.finetune.tasks import Example, get_task, read_split, read_task
from vlmerge.precompute.tokenizer import train_bpe
from vlmerge.problems import ProblemLog

from conftest import stale_temp

MAX_LENGTH = 16  # small, so that the long fixture line is truncated

# dataset.py `Dataset.__init__`'s match: A keys, B keys (None: a single text), A template (None: joined by " ")
OFFICIAL_FIELDS = {
    "boolq": (["question"], ["passage"], None),
    "cola": (["sentence"], None, None),
    "mnli": (["premise"], ["hypothesis"], None),
    "multirc": (["question", "answer"], ["paragraph"], "Question: {} Answer: {}"),
    "rte": (["sentence1"], ["sentence2"], None),
    "wsc": (["span2_text", "span1_text"], ["text"], 'Does "{}" refer to "{}" in this passage?'),
}
LABELS = {"mnli": 3}  # eval_finetuning.sh's --num_labels (2 elsewhere)

WORDS = ("the a cat dog bird sat ran on under mat box red blue is was not yes no it he she they "
         "Question Answer Does refer to in this passage . ? \"").split()


# --- fixtures ------------------------------------------------------------------------------------------------


def sentence(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS[:-3]) for _ in range(k))


def official_rows(task: str, n: int, seed: int) -> list[dict]:
    """`n` lines of `task` in the official format; line 1 is far longer than MAX_LENGTH tokens; labels of
    every class; BoolQ's labels are JSON booleans (as SuperGLUE's)."""
    rng = random.Random(seed)
    a_keys, b_keys, _ = OFFICIAL_FIELDS[task]
    rows = []
    for i in range(n):
        row = {key: sentence(rng, 30 if i == 1 else rng.randint(1, 6)) for key in a_keys + (b_keys or [])}
        label = i % LABELS.get(task, 2) if i < 3 else rng.randrange(LABELS.get(task, 2))
        row["label"] = bool(label) if task == "boolq" else label
        row["idx"] = i
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task(folder: Path, task: str, n_train: int, n_valid: int, seed: int = 0) -> Path:
    write_jsonl(folder / f"{task}.train.jsonl", official_rows(task, n_train, seed))
    write_jsonl(folder / f"{task}.valid.jsonl", official_rows(task, n_valid, seed + 1))
    return folder


def bpe():
    return train_bpe([" ".join(WORDS)] * 3, TokenizerConfig(vocab_size=300), progress=False)


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    """plain: no special tokens (our BPE); bos_eos: `<s> A` and `<s> A </s> B`, so that a pair is a pair."""
    plain, framed = bpe(), bpe()
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1",
        special_tokens=[("<s>", framed.bos_token_id), ("</s>", framed.eos_token_id)])
    return {"plain": plain, "bos_eos": framed}


def tiny_llama(tok, seed: int = 1, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizers) -> Path:
    """A tiny causal LM directory (save_pretrained) with its tokenizer files."""
    tok = tokenizers["bos_eos"]
    folder = tmp_path_factory.mktemp("tiny_lm")
    tiny_llama(tok, layers=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- the official data handling, one item at a time -----------------------------------------------------------


def official_load(path: Path, task: str) -> tuple[list, list]:
    """dataset.py `Dataset.load_file`: per line, the A string from its keys (template, else joined by a
    space), the B string likewise, the text (A, B) or A; and the label."""
    a_keys, b_keys, a_template = OFFICIAL_FIELDS[task]
    texts, labels = [], []
    with path.open("r") as f:
        for line in f:
            data = json.loads(line)
            a_values = [data[key] for key in a_keys]
            a = a_template.format(*a_values) if a_template is not None else " ".join(a_values)
            if b_keys is not None:
                b = " ".join(data[key] for key in b_keys)  # the pipeline's B_template is never set
                texts.append((a, b))
            else:
                texts.append(a)
            labels.append(data["label"])
    return texts, labels


def official_collate(tok, texts: list, max_length: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """dataset.py `collate_function` (causal=False: the mask as the tokenizer gives it) with the trainer's
    tokenizer, whose padding side is `--padding_side`."""
    saved = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tok.padding_side = saved
    return enc["input_ids"], enc["attention_mask"]


def official_one(tok, text, max_length: int | None) -> list[int]:
    """One item's ids as a batch of one gives them (a batch of one is never padded)."""
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    return tok([text], **kw)["input_ids"][0]


@pytest.mark.parametrize("kind", ["plain", "bos_eos"])
@pytest.mark.parametrize("task", ["rte", "multirc", "wsc", "boolq", "cola", "mnli"])
def test_inputs_equal_the_official_collate_item_by_item(task, kind, tokenizers, tmp_path):
    tok = tokenizers[kind]
    # MultiRC's and WSC's templates take 10 to 30 tokens themselves: room for their fields
    length = {"multirc": 2 * MAX_LENGTH, "wsc": 3 * MAX_LENGTH}.get(task, MAX_LENGTH)
    path = write_jsonl(tmp_path / f"{task}.valid.jsonl", official_rows(task, 9, seed=3))
    texts, labels = official_load(path, task)
    problems = ProblemLog()
    examples = read_split(get_task(task), path, problems)
    assert not problems.items
    assert len(examples) == len(texts) == 9
    # the labels as the collate function's torch.tensor(labels, dtype=long) makes them (BoolQ's booleans 0/1)
    assert [e.label for e in examples] == torch.tensor(labels, dtype=torch.long).tolist()
    ids = loop.encode(tok, examples, length)
    for i, text in enumerate(texts):
        assert ids[i] == official_one(tok, text, length), (task, i, text)
    assert len(official_one(tok, texts[1], None)) > length  # truncation matters
    assert max(map(len, ids)) == length and len(set(map(len, ids))) > 1  # padding matters
    for side in ("left", "right"):
        want_ids, want_mask = official_collate(tok, texts, length, side)
        got_ids, got_mask = loop.pad(ids, tok.pad_token_id, side)
        assert torch.equal(got_ids, want_ids), side
        assert torch.equal(got_mask, want_mask), side


def test_a_pair_is_tokenised_as_a_pair_and_templates_fill_in_field_order(tokenizers, tmp_path):
    """What the comparison above hinges on: with bos_eos a pair is `<s> A </s> B`, and WSC's template
    takes span2_text before span1_text."""
    tok = tokenizers["bos_eos"]
    wsc = write_jsonl(tmp_path / "wsc.valid.jsonl", [{"text": "the cat sat", "span1_text": "the cat",
                                                      "span2_text": "it", "label": 1}])
    (ex,) = read_split(get_task("wsc"), wsc, ProblemLog())
    assert (ex.a, ex.b, ex.label) == ('Does "it" refer to "the cat" in this passage?', "the cat sat", 1)
    multirc = write_jsonl(tmp_path / "multirc.valid.jsonl", [{"question": "is it red", "answer": "yes",
                                                              "paragraph": "the box is red", "label": 0}])
    (ex,) = read_split(get_task("multirc"), multirc, ProblemLog())
    assert (ex.a, ex.b) == ("Question: is it red Answer: yes", "the box is red")
    (ids,) = loop.encode(tok, [ex], 64)
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids


def test_pad_on_each_side_by_hand():
    ids, mask = loop.pad([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = loop.pad([[5, 6, 7], [8]], 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- metrics ---------------------------------------------------------------------------------------------------


def test_binary_metrics_equal_hand_computed_values():
    labels, preds = np.array([1, 0, 1, 1, 0]), np.array([1, 1, 0, 1, 0])
    # TP = 2 (items 0, 3), FP = 1 (item 1), FN = 1 (item 2), TN = 1 (item 4)
    assert metrics.accuracy(labels, preds) == pytest.approx(3 / 5)
    assert metrics.f1(labels, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 0.6667
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 − 1) / sqrt(3·3·2·2) = 1/6
    assert metrics.mcc(labels, preds) == pytest.approx(1 / 6)
    assert metrics.classification_metrics(("accuracy", "f1", "mcc"), labels, preds) == pytest.approx(
        {"accuracy": 0.6, "f1": 2 / 3, "mcc": 1 / 6})
    perfect = np.array([0, 1, 1, 0])
    assert (metrics.accuracy(perfect, perfect), metrics.f1(perfect, perfect), metrics.mcc(perfect, perfect)) == \
        pytest.approx((1.0, 1.0, 1.0))
    assert metrics.mcc(perfect, 1 - perfect) == pytest.approx(-1.0)


def test_metrics_where_a_denominator_is_zero_are_zero():
    zeros, ones = np.zeros(4, dtype=int), np.ones(4, dtype=int)
    assert metrics.f1(zeros, zeros) == 0.0  # no positive at all (scikit-learn: 0, "ill-defined")
    assert metrics.f1(zeros, np.array([0, 0, 1, 0])) == 0.0  # TP = 0
    labels = np.array([1, 0, 1, 0])
    assert metrics.mcc(labels, ones) == 0.0  # constant predictions
    assert metrics.mcc(labels, zeros) == 0.0
    assert metrics.mcc(ones, labels) == 0.0  # constant labels
    assert metrics.mcc(zeros, zeros) == 0.0
    assert metrics.accuracy(zeros, zeros) == 1.0


def gorodkin(labels, preds) -> float:
    """Gorodkin's R_K from the confusion matrix, one cell at a time (0 when undefined, as scikit-learn)."""
    classes = sorted(set(labels) | set(preds))
    n, correct = len(labels), 0
    t = {k: 0 for k in classes}
    p = {k: 0 for k in classes}
    for y, q in zip(labels, preds):
        t[y] += 1
        p[q] += 1
        correct += y == q
    cov_tp = correct * n - sum(t[k] * p[k] for k in classes)
    cov_pp = n * n - sum(p[k] * p[k] for k in classes)
    cov_tt = n * n - sum(t[k] * t[k] for k in classes)
    return cov_tp / math.sqrt(cov_pp * cov_tt) if cov_pp * cov_tt else 0.0


def test_multiclass_mcc_equals_gorodkins_formula():
    labels = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
    preds = [0, 2, 2, 1, 1, 0, 1, 2, 1, 0]
    assert metrics.mcc(np.array(labels), np.array(preds)) == pytest.approx(gorodkin(labels, preds))
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels, preds = rng.integers(0, 3, 25), rng.integers(0, 3, 25)
        preds[:10] = labels[:10]
        assert metrics.mcc(labels, preds) == pytest.approx(gorodkin(list(labels), list(preds)), abs=1e-12)
    # a class only predicted, never a label
    assert metrics.mcc(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])) == pytest.approx(
        gorodkin([0, 0, 1, 1], [0, 2, 1, 1]))


def test_metrics_equal_scikit_learn_as_the_pipeline_calls_it():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for k in range(30):
        labels, preds = rng.integers(0, 2, 12), rng.integers(0, 2, 12)
        if k == 0:
            labels[:] = 0
            preds[:] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = (sk.accuracy_score(labels, preds), sk.f1_score(labels, preds), sk.matthews_corrcoef(labels, preds))
        got = (metrics.accuracy(labels, preds), metrics.f1(labels, preds), metrics.mcc(labels, preds))
        assert got == pytest.approx(want, abs=1e-12), (labels, preds)


# --- the head ---------------------------------------------------------------------------------------------------


def test_classifier_head_is_the_pipelines_layers_in_order():
    head = classifier.classifier_head(24, 3, 0.25, 1e-6)
    types = [type(m) for m in head]
    assert types == [nn.LayerNorm, nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout, nn.Linear]
    for norm in (head[0], head[3]):
        assert norm.weight is None and norm.bias is None and not norm.elementwise_affine
        assert norm.eps == 1e-6 and tuple(norm.normalized_shape) == (24,)
    assert (head[1].in_features, head[1].out_features) == (24, 24)
    assert head[4].p == 0.25
    assert (head[5].in_features, head[5].out_features) == (24, 3)


def test_last_token_on_left_and_right_padded_masks():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert classifier.last_token(left).tolist() == [3, 3, 3]
    assert classifier.last_token(right).tolist() == [1, 3, 0]


def ex(a: str, b: str | None = None, label: int = 0) -> Example:
    return Example(a, b, label)


def test_sequence_classifier_reads_the_last_real_token_on_either_padding_side(tokenizers):
    tok = tokenizers["bos_eos"]
    lm = tiny_llama(tok)
    torch.manual_seed(0)
    model = classifier.SequenceClassifier(lm, 2, dropout=0.1, eps=1e-5).eval()
    assert model.base is lm.model  # the decoder without its LM head
    seqs = loop.encode(tok, [ex("the cat", "sat on the mat"), ex("a dog ran under the red box", "it is blue"),
                             ex("no", "yes")], 64)
    assert len({len(s) for s in seqs}) == 3
    with torch.no_grad():
        alone = torch.cat([model(*loop.pad([s], tok.pad_token_id, "left")) for s in seqs])
        left = model(*loop.pad(seqs, tok.pad_token_id, "left"))
        right = model(*loop.pad(seqs, tok.pad_token_id, "right"))
        # not vacuous: the state at a right-padded row's last column (a pad) gives other logits
        ids, mask = loop.pad(seqs, tok.pad_token_id, "right")
        at_end = model.head(model.base(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1])
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(at_end[2], alone[2], atol=1e-3)


# --- the schedule -----------------------------------------------------------------------------------------------


def official_lr_lambda(current_step: int, num_warmup_steps: int, num_training_steps: int, min_factor: float) -> float:
    """utils.py `cosine_schedule_with_warmup`'s `_lr_lambda`."""
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(min_factor, min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_cosine_with_warmup_equals_the_official_lambda_at_every_step():
    got = [loop.cosine_with_warmup(s, 3, 20, 0.1) for s in range(21)]
    want = [official_lr_lambda(s, 3, 20, 0.1) for s in range(21)]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[0] == 0.0 and got[1] == pytest.approx(1 / 3) and got[3] == pytest.approx(1.0)
    assert got[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(got[3:], got[4:]))  # decays after the warm-up
    assert [loop.cosine_with_warmup(s, 0, 5, 0.0) for s in range(6)] == pytest.approx(
        [official_lr_lambda(s, 0, 5, 0.0) for s in range(6)])


def small_recipe(**kw) -> loop.Recipe:
    base = dict(lr=1e-3, batch_size=4, epochs=2, seed=42, max_length=MAX_LENGTH, valid_batch_size=3, dropout=0.1,
                layer_norm_eps=1e-5, weight_decay=0.01, warmup_proportion=0.3, min_factor=0.1, betas=(0.9, 0.999),
                eps=1e-8, padding_side="left")
    return loop.Recipe(**{**base, **kw})


def rte_splits(tmp_path: Path, n_train: int = 18, n_valid: int = 7):
    folder = write_task(tmp_path / "glue", "rte", n_train, n_valid)
    return read_task(get_task("rte"), folder, ProblemLog())


def test_run_steps_the_learning_rate_as_the_official_trainer(tokenizers, tmp_path):
    """Steps per epoch: train lines // batch (drop_last); warm-up int(proportion · total)."""
    tok = tokenizers["bos_eos"]
    rec = small_recipe(epochs=3)
    run = loop.Run(tiny_llama(tok, layers=1), tok, get_task("rte"), rte_splits(tmp_path), rec)
    total = 18 // 4 * 3
    assert run.steps_per_epoch == 4
    warmup = int(0.3 * total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the schedule stepped here without optimizer steps
        for step in range(total + 1):
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(rec.lr * official_lr_lambda(
                step, warmup, total, 0.1), abs=1e-15), step
            run.schedule.step()


# --- batches ----------------------------------------------------------------------------------------------------


def test_epoch_batches_full_distinct_length_sorted_and_seeded():
    gen = np.random.default_rng(5)
    lengths = gen.integers(0, 1000, 1003)
    bs = 8
    rng = np.random.default_rng(0)
    first = loop.epoch_batches(lengths, bs, rng)
    second = loop.epoch_batches(lengths, bs, rng)
    for batches in (first, second):
        assert all(len(b) == bs for b in batches)
        rows = np.concatenate(batches)
        assert len(rows) == len(set(rows.tolist())) == 1003 // bs * bs
        assert rows.min() >= 0 and rows.max() < 1003
    # little padding: the padded tokens of an epoch well below those of random batches
    def padded(batches):
        return sum(bs * lengths[b].max() for b in batches)

    shuffled = np.random.default_rng(1).permutation(1003)[:1000].reshape(-1, bs)
    assert padded(first) < 0.75 * padded(shuffled), (padded(first), padded(shuffled))
    # the rng advances: another epoch, other batches
    assert {frozenset(b.tolist()) for b in first} != {frozenset(b.tolist()) for b in second}
    # the same seed, the same batches
    again = loop.epoch_batches(lengths, bs, np.random.default_rng(0))
    assert [b.tolist() for b in again] == [b.tolist() for b in first]
    # the batch order is shuffled too, not by length
    firsts = [lengths[b].min() for b in first]
    assert firsts != sorted(firsts)


def test_epoch_batches_change_batch_mates_even_when_one_window_holds_the_task():
    # 123 items fill one length-sorted window: sorted by the bare lengths, an epoch's batches would be
    # nearly the last epoch's (2/3 to 9/10 of the pairs met again); the jittered sort mixes them
    lengths = np.random.default_rng(5).integers(0, 1000, 123)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        first, second = loop.epoch_batches(lengths, 8, rng), loop.epoch_batches(lengths, 8, rng)
        batch_of = {i: k for k, b in enumerate(first) for i in b.tolist()}
        pairs = [(a, c) for b in second for x, a in enumerate(b.tolist()) for c in b.tolist()[x + 1:]
                 if a in batch_of and c in batch_of]
        assert np.mean([batch_of[a] == batch_of[c] for a, c in pairs]) < 0.5, seed


def test_epoch_batches_drop_the_last_incomplete_batch():
    batches = loop.epoch_batches(np.arange(10), 4, np.random.default_rng(0))
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(np.concatenate(batches).tolist())) == 8


# --- the run ----------------------------------------------------------------------------------------------------


def test_predictions_in_sorted_batches_equal_one_item_at_a_time(tokenizers, tmp_path):
    tok = tokenizers["bos_eos"]
    splits = rte_splits(tmp_path, n_valid=12)
    run = loop.Run(tiny_llama(tok, layers=1), tok, get_task("rte"), splits, small_recipe(epochs=1, max_length=64))
    run.train_epoch(np.random.default_rng(0))
    with torch.no_grad():  # a head whose arg-max follows the input, so that an item's place matters
        run.model.head[5].weight.mul_(100)
    got = run.predict()
    run.model.eval()
    with torch.no_grad():
        want = [int(run.model(*loop.pad([s], tok.pad_token_id, "left")).argmax(-1)) for s in run.ids["valid"]]
    assert got.tolist() == want
    assert set(want) == {0, 1}  # not vacuous
    lengths = [len(s) for s in run.ids["valid"]]
    assert lengths != sorted(lengths) and len(lengths) > run.recipe.valid_batch_size  # sorted, in several batches


def finetuned_state(tok, splits, *, global_seed: int, seed: int) -> dict[str, torch.Tensor]:
    lm = tiny_llama(tok, layers=1)  # the same pretrained weights each time
    torch.manual_seed(global_seed)  # whatever ran before in the process
    run = loop.Run(lm, tok, get_task("rte"), splits, small_recipe(seed=seed))
    run.run()
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def test_fine_tuning_is_a_function_of_the_seed_alone(tokenizers, tmp_path):
    """The pipeline seeds every generator with --seed before it builds the model (run.py
    `seed_everything`): the head's initial weights, the training order and the dropout masks are all
    the seed's. Ours must not depend on the process's global torch generator (what ran before in it,
    e.g. another task of the same `vlmerge finetune` call)."""
    tok = tokenizers["bos_eos"]
    splits = rte_splits(tmp_path)
    a = finetuned_state(tok, splits, global_seed=0, seed=42)
    c = finetuned_state(tok, splits, global_seed=0, seed=7)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters
    b = finetuned_state(tok, splits, global_seed=123, seed=42)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (f"same recipe seed, another global torch seed: {len(differ)} of {len(a)} fine-tuned "
                        f"tensors differ (e.g. {differ[0]}); the head's dropout draws from the unseeded global "
                        "generator (loop.py Run.train_epoch; only the head's init is seeded)")


# --- recipes ----------------------------------------------------------------------------------------------------

# eval_finetuning.sh: task -> (batch, epochs, num_labels, metrics, metric_for_valid)
SCRIPT = {
    "boolq": ("BIG_BSZ", "MAX_EPOCHS", 2, ("accuracy", "f1", "mcc"), "accuracy"),
    "multirc": ("BIG_BSZ", "MAX_EPOCHS", 2, ("accuracy", "f1", "mcc"), "accuracy"),
    "rte": ("BSZ", "MAX_EPOCHS", 2, ("accuracy", "f1", "mcc"), "accuracy"),
    "wsc": ("BSZ", "WSC_EPOCHS", 2, ("accuracy", "f1", "mcc"), "accuracy"),
    "mrpc": ("BSZ", "MAX_EPOCHS", 2, ("accuracy", "f1", "mcc"), "f1"),
    "qqp": ("BSZ", "MAX_EPOCHS", 2, ("accuracy", "f1", "mcc"), "f1"),
    "mnli": ("BSZ", "MAX_EPOCHS", 3, ("accuracy",), "accuracy"),
}


@pytest.mark.parametrize("name", sorted(SCRIPT))
def test_recipes_are_eval_finetuning_sh(name):
    cfg = load_config(None, ["finetune.batch_size=7", "finetune.big_batch_size=3", "finetune.epochs=4",
                             "finetune.wsc_epochs=9", "finetune.lr=2e-4", "finetune.seed=5"])
    values = {"BSZ": 7, "BIG_BSZ": 3, "MAX_EPOCHS": 4, "WSC_EPOCHS": 9}
    batch, epochs, num_labels, metric_names, for_valid = SCRIPT[name]
    task = get_task(name)
    r = recipe(cfg.finetune, task)
    assert (r.batch_size, r.epochs, r.lr, r.seed) == (values[batch], values[epochs], 2e-4, 5)
    assert (task.num_labels, task.metrics, task.metric_for_valid) == (num_labels, metric_names, for_valid)


def test_default_recipe_is_the_pipelines():
    """eval_finetuning.sh's defaults (LR, BSZ, BIG_BSZ, MAX_EPOCHS, WSC_EPOCHS, SEED, --sequence_length 512)
    and run.py's (valid batch 64, dropout 0.1, eps 1e-5, weight decay 0.01, warm-up 0.06, min factor 0.1,
    betas, optimizer eps)."""
    fc = FinetuneConfig()  # the section's defaults (the demo config changes lr and epochs)
    r = recipe(fc, get_task("rte"))
    assert (r.lr, r.batch_size, r.epochs, r.seed, r.max_length) == (3e-5, 32, 10, 42, 512)
    assert (r.valid_batch_size, r.dropout, r.layer_norm_eps, r.weight_decay, r.warmup_proportion, r.min_factor,
            r.betas, r.eps) == (64, 0.1, 1e-5, 0.01, 0.06, 0.1, (0.9, 0.999), 1e-8)
    assert recipe(fc, get_task("boolq")).batch_size == 16 and recipe(fc, get_task("wsc")).epochs == 30


# --- end to end through the CLI ---------------------------------------------------------------------------------

FAST = ["finetune.epochs=2", "finetune.batch_size=4", f"finetune.max_length={MAX_LENGTH}",
        "finetune.valid_batch_size=4", "finetune.lr=1e-3", "compute.device=cpu"]


@pytest.fixture
def cli(tmp_path, model_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"paths:\n  root: {tmp_path / 'root'}\n", encoding="utf-8")

    def run(out: Path, *tasks: str, extra: tuple[str, ...] = ()) -> int:
        args = ["finetune", "--config", str(cfg), "--quiet", "--model", str(model_dir), "--out", str(out)]
        for t in tasks:
            args += ["--task", t]
        return main([*args, *FAST, *extra])

    return run


def valid_labels(folder: Path, task: str) -> list[int]:
    return [int(json.loads(line)["label"]) for line in (folder / f"{task}.valid.jsonl").read_text().splitlines()]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cli_writes_the_pipelines_files_and_our_rows(cli, tmp_path, capsys):
    folder = write_task(tmp_path / "glue", "rte", 24, 10)
    out = tmp_path / "out"
    assert cli(out, f"rte={folder}") == 0
    assert "finetune rte: accuracy" in capsys.readouterr().out
    task_dir = out / "finetune" / "rte"
    assert sorted(p.name for p in task_dir.iterdir()) == ["items.parquet", "predictions.json", "results.parquet",
                                                          "results.txt"]
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["rte"]
    # results.txt: run.py's "key: value" lines, the metrics in --metrics order
    lines = (task_dir / "results.txt").read_text().split("\n")
    assert [line.split(": ")[0] for line in lines] == ["accuracy", "f1", "mcc"]
    txt = {k: float(v) for k, v in (line.split(": ") for line in lines)}
    # predictions.json: {"rte": {"predictions": [{"id": "rte_<i>", "pred": <int>}]}}, one per valid line, in order
    pred = json.loads((task_dir / "predictions.json").read_text())
    assert list(pred) == ["rte"] and list(pred["rte"]) == ["predictions"]
    entries = pred["rte"]["predictions"]
    assert [e["id"] for e in entries] == [f"rte_{i}" for i in range(10)]
    assert all(set(e) == {"id", "pred"} and type(e["pred"]) is int and e["pred"] in (0, 1) for e in entries)
    # the scores are those of the predictions (the kept epoch's)
    labels, preds = valid_labels(folder, "rte"), [e["pred"] for e in entries]
    tp = sum(p == 1 and y == 1 for y, p in zip(labels, preds))
    fp = sum(p == 1 and y == 0 for y, p in zip(labels, preds))
    fn = sum(p == 0 and y == 1 for y, p in zip(labels, preds))
    assert txt["accuracy"] == pytest.approx(sum(p == y for y, p in zip(labels, preds)) / 10)
    assert txt["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert txt["mcc"] == pytest.approx(gorodkin(labels, preds))
    # our Parquet rows
    results = pd.read_parquet(task_dir / "results.parquet")
    assert results["task"].tolist() == ["glue/rte"] * 3 and results["metric"].tolist() == ["accuracy", "f1", "mcc"]
    assert results["n"].tolist() == [10] * 3
    assert dict(zip(results["metric"], results["value"])) == pytest.approx(txt)
    items = pd.read_parquet(task_dir / "items.parquet")
    assert len(items) == 10 and set(items["value"]) <= {0.0, 1.0}
    assert items["example_id"].tolist() == [f"rte_{i}" for i in range(10)]
    assert items["value"].tolist() == [float(p == y) for y, p in zip(labels, preds)]
    assert items["value"].mean() == pytest.approx(txt["accuracy"])
    # a rerun: done before, nothing written
    before = mtimes(task_dir)
    assert cli(out, f"rte={folder}") == 0
    assert f"finetune rte: done before ({task_dir})" in capsys.readouterr().out
    assert mtimes(task_dir) == before


def test_cli_same_seed_same_predictions(cli, tmp_path):
    folder = write_task(tmp_path / "glue", "rte", 24, 10)
    assert cli(tmp_path / "a", f"rte={folder}") == 0
    torch.manual_seed(999)  # another state of the process's global generator
    assert cli(tmp_path / "b", f"rte={folder}") == 0
    for name in ("predictions.json", "results.txt"):
        assert (tmp_path / "a/finetune/rte" / name).read_text() == (tmp_path / "b/finetune/rte" / name).read_text()


def test_cli_missing_valid_file_is_a_one_line_error(cli, tmp_path, capsys):
    folder = write_task(tmp_path / "glue", "rte", 24, 10)
    (folder / "rte.valid.jsonl").unlink()
    out = tmp_path / "out"
    assert cli(out, f"rte={folder}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rte.valid.jsonl" in err[0] and err[0].startswith("vlmerge finetune: error:"), err
    assert not (out / "finetune" / "rte").exists()


@pytest.mark.parametrize("bad", [{"sentence1": "the cat", "sentence2": "a dog", "label": 2},
                                 {"sentence1": "the cat", "label": 1}], ids=["bad_label", "missing_field"])
def test_cli_a_bad_line_is_a_problem_not_fatal(cli, tmp_path, capsys, bad):
    folder = write_task(tmp_path / "glue", "rte", 24, 10)
    train = folder / "rte.train.jsonl"
    train.write_text(train.read_text() + json.dumps(bad) + "\n")
    out = tmp_path / "out"
    assert cli(out, f"rte={folder}") == 0
    err = capsys.readouterr().err
    assert "finetune: 1 problem(s)" in err and "rte.train.jsonl:25" in err
    assert ("bad label" if "sentence2" in bad else "missing field: 'sentence2'") in err
    assert len(json.loads((out / "finetune/rte/predictions.json").read_text())["rte"]["predictions"]) == 10


def test_cli_interrupted_fine_tuning_leaves_no_folder_and_no_temps(cli, tmp_path, monkeypatch):
    folder = write_task(tmp_path / "glue", "rte", 24, 10)
    out = tmp_path / "out"
    calls, logits = [], loop.Run.logits

    def fail_after_first_epoch(self, split="valid"):
        calls.append(split)
        if len(calls) > 1:
            raise RuntimeError("killed mid-way")
        return logits(self, split)

    monkeypatch.setattr(loop.Run, "logits", fail_after_first_epoch)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        cli(out, f"rte={folder}")
    assert len(calls) == 2
    assert not (out / "finetune" / "rte").exists()
    monkeypatch.undo()
    # a writer killed while it wrote the folder leaves a temp beside it: the next run removes it
    stale = stale_temp(out / "finetune" / "rte", is_dir=True)
    assert cli(out, f"rte={folder}") == 0
    assert not stale.exists()
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["rte"]
    assert (out / "finetune/rte/results.txt").is_file()


def test_cli_mnli_three_labels_accuracy_alone(cli, tmp_path):
    folder = write_task(tmp_path / "glue", "mnli", 24, 9)
    out = tmp_path / "out"
    assert cli(out, f"mnli={folder}") == 0
    lines = (out / "finetune/mnli/results.txt").read_text().split("\n")
    assert len(lines) == 1 and lines[0].startswith("accuracy: ")
    preds = [e["pred"] for e in json.loads((out / "finetune/mnli/predictions.json").read_text())["mnli"]["predictions"]]
    assert len(preds) == 9 and set(preds) <= {0, 1, 2}
    labels = valid_labels(folder, "mnli")
    assert float(lines[0].split(": ")[1]) == pytest.approx(sum(p == y for y, p in zip(labels, preds)) / 9)
    results = pd.read_parquet(out / "finetune/mnli/results.parquet")
    assert results["metric"].tolist() == ["accuracy"] and results["task"].tolist() == ["glue/mnli"]


# --- Sung et al.'s vision-language tasks (ft_vqa, ft_nlvr2) on the small demo world ---------------------------


@pytest.fixture(scope="module")
def vl(small_prepared):
    """(root, tokenizer, features, a tiny multimodal model) of the small prepared world."""
    from transformers import AutoTokenizer

    from conftest import SMALL_WORLD
    from vlmerge.config import ModelConfig
    from vlmerge.data import FeatureTable
    from vlmerge.model import build_config, init_model

    cfg = load_config(None, [f"paths.root={small_prepared}", *SMALL_WORLD])
    tok = AutoTokenizer.from_pretrained(cfg.layout.tokenizer_dir)
    features = FeatureTable(cfg.store_path)
    config = build_config(ModelConfig(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, max_length=64),
                          tok, features.dim)
    return small_prepared, tok, features, init_model(config, 0)


def test_vl_tasks_read_the_demo_sets_with_images_of_the_store(vl):
    root, _, features, _ = vl
    vqa = read_task(get_task("ft_vqa"), root / "demo/eval/vl/vqa", ProblemLog(), FinetuneConfig(vqa_min_answer_count=1))
    nlvr2 = read_task(get_task("ft_nlvr2"), root / "demo/eval/vl/nlvr2", ProblemLog())
    for splits in (vqa, nlvr2):
        ids = np.array([i for examples in splits.values() for e in examples for i in e.images])
        assert (features.rows(ids) >= 0).all()
    # VQA: one image; every training example has a target in the vocabulary, its label the best one
    assert all(len(e.images) == 1 and e.b is None for e in vqa["train"] + vqa["valid"])
    assert all(e.targets and e.label == max(e.targets, key=lambda t: (t[1], -t[0]))[0] for e in vqa["train"])
    assert {s for e in vqa["train"] for _, s in e.targets} <= {0.3, 0.6, 0.9, 1.0}
    # NLVR²: the statement after two images, true or false, half and half
    assert all(len(e.images) == 2 for e in nlvr2["train"]) and {e.label for e in nlvr2["valid"]} == {0, 1}
    assert get_task("ft_vqa").result_name == "ft_vqa" and get_task("rte").result_name == "glue/rte"


def test_a_multimodal_model_reads_each_examples_images_behind_as_many_image_tokens(vl):
    _, tok, features, model = vl
    two, none = Example("left and right", None, 1, ("wg-000000-0", "wg-000001-1")), Example("text alone", None, 0)
    images = loop.ImageInputs(features, "<image>")
    pixels = images.pixels([two, none])
    rows = features.rows(np.array(two.images))
    assert torch.equal(pixels, torch.stack([features.features[rows[0]].float(), features.features[rows[1]].float(),
                                           features.null]))
    ids = loop.encode(tok, [two, none], 64, images)
    image_token = tok.convert_tokens_to_ids("<image>")
    assert [seq.count(image_token) for seq in ids] == [2, 1]
    assert tok.decode(ids[0]).startswith("<image><image> left")
    with pytest.raises(Exception, match="shows images|reads none"):
        loop.Run(model, tok, get_task("ft_nlvr2"), {"train": [two] * 4, "valid": [two]}, small_recipe(batch_size=2))


def test_vqa_soft_score_of_a_prediction_is_the_official_vqa_accuracy_of_its_answer(vl):
    from vlmerge.finetune import vl_data

    root = vl[0]
    folder = root / "demo/eval/vl/vqa"
    train = vl_data.read_vqa(folder / "v2_OpenEnded_mscoco_train2014_questions.json",
                             folder / "v2_mscoco_train2014_annotations.json", ProblemLog())
    val = vl_data.read_vqa(folder / "v2_OpenEnded_mscoco_val2014_questions.json",
                           folder / "v2_mscoco_val2014_annotations.json", ProblemLog())
    vocab = vl_data.vqa_answer_vocab(train, 1)
    examples = read_task(get_task("ft_vqa"), folder, ProblemLog(), FinetuneConfig(vqa_min_answer_count=1))["valid"]
    soft = loop.soft_targets(examples, len(vocab))
    preds = np.random.default_rng(0).integers(0, len(vocab), len(examples))
    want = metrics.vqa_score([vocab[p] for p in preds], [q.answers for q in val])  # the strings, the official rule
    assert metrics.classification_metrics(("vqa_score",), np.zeros(len(preds)), preds, soft)["vqa_score"] == \
        pytest.approx(want, abs=1e-6)


def test_vl_fine_tuning_runs_on_image_examples_and_reports_the_tasks_metrics(vl):
    root, tok, features, model = vl
    splits = read_task(get_task("ft_vqa"), root / "demo/eval/vl/vqa", ProblemLog(), FinetuneConfig(vqa_min_answer_count=1))
    run = loop.Run(model, tok, get_task("ft_vqa"), splits, small_recipe(epochs=2, batch_size=8, max_length=64, lr=1e-3),
                   images=loop.ImageInputs(features, "<image>"))
    assert run.num_labels == 1 + max(t for e in splits["train"] for t, _ in e.targets)
    outcome = run.run()
    assert set(outcome.metrics) == {"vqa_score", "accuracy"} and len(outcome.preds) == len(splits["valid"])
    # a right label (the best answer) scores at least 0.3, any other label at most what the best scores
    assert 0 <= 0.3 * outcome.metrics["accuracy"] <= outcome.metrics["vqa_score"] <= 1


def test_retrieval_trains_on_matched_and_random_pairs_and_ranks_every_test_pair(vl):
    root = vl[0]
    splits = read_task(get_task("ft_retrieval"), root / "demo/eval/vl/retrieval", ProblemLog())
    train, valid = splits["train"], splits["valid"]
    # each caption twice: with its image (1), then with another training image (0)
    assert [e.label for e in train[:4]] == [1, 0, 1, 0] and all(len(e.images) == 1 for e in train)
    assert all(a.a == b.a and a.images != b.images for a, b in zip(train[::2], train[1::2]))
    # the test split: every image with every caption, image-major, one matching image per caption
    labels = np.array([e.label for e in valid])
    n_captions = int(labels.sum())
    grid = labels.reshape(-1, n_captions)
    assert (grid.sum(axis=0) == 1).all() and len(valid) == grid.shape[0] * n_captions
    assert len({e.images for e in valid[:n_captions]}) == 1
    # the recalls rank the match margins of the pairs: perfect margins give 1 everywhere
    margins = np.where(labels == 1, 2.0, -1.0)
    perfect = metrics.classification_metrics(get_task("ft_retrieval").metrics, labels, labels,
                                             logits=np.stack([np.zeros_like(margins), margins], axis=1))
    assert all(v == 1.0 for v in perfect.values())
    logits = np.random.default_rng(0).normal(size=(len(valid), 2)).astype(np.float32)
    got = metrics.pair_recalls(labels, logits)
    want = metrics.retrieval_recalls((logits[:, 1] - logits[:, 0]).reshape(grid.shape), grid.argmax(axis=0))
    assert got == want and 0 < got["r_mean"] < 1


def test_a_task_recipe_overrides_the_common_one_for_that_task_only():
    from vlmerge.config import FinetuneConfig
    from vlmerge.errors import VlmergeError
    from vlmerge.finetune.run import recipe

    # Sung et al.'s Table 6 for NLVR²: lr 5e-5, batch 128, 10 epochs; the rest stays the common recipe
    fc = FinetuneConfig(lr=1e-3, epochs=3, recipes={"ft_nlvr2": {"lr": 5e-5, "batch_size": 128, "epochs": 10}})
    nlvr2, vqa = recipe(fc, get_task("ft_nlvr2")), recipe(fc, get_task("ft_vqa"))
    assert (nlvr2.lr, nlvr2.batch_size, nlvr2.epochs, nlvr2.weight_decay) == (5e-5, 128, 10, 0.01)
    assert (vqa.lr, vqa.batch_size, vqa.epochs) == (1e-3, 32, 3)
    wsc = recipe(FinetuneConfig(recipes={"wsc": {"lr": 1e-4}}), get_task("wsc"))
    assert (wsc.lr, wsc.epochs) == (1e-4, 30)  # the task's long schedule stays
    with pytest.raises(VlmergeError, match="finetune.recipes: 'nlvr' is not a fine-tuning task"):
        recipe(FinetuneConfig(recipes={"nlvr": {"lr": 1e-4}}), get_task("rte"))


def test_vqa_items_score_the_predicted_answers_soft_target_so_their_mean_is_the_vqa_score():
    from vlmerge.finetune.loop import Outcome

    soft = np.array([[1.0, 0.3, 0.0], [0.0, 0.6, 0.9], [0.3, 0.0, 0.0]], dtype=np.float32)  # as soft_targets
    preds, labels = np.array([1, 2, 2]), np.array([0, 2, 0])
    scores = metrics.classification_metrics(("vqa_score",), labels, preds, soft)
    vqa = Outcome(scores, preds, labels, 0, 1, 0.0, soft)
    assert vqa.item_scores() == pytest.approx([0.3, 0.9, 0.0])  # by hand: each row's target at its prediction
    # their mean is the reported score to the last digit (the analysis draws intervals only then)
    assert abs(vqa.item_scores().astype(np.float64).mean() - scores["vqa_score"]) < 1e-15
    assert Outcome({}, preds, labels, 0, 1, 0.0).item_scores().tolist() == [0.0, 1.0, 0.0]  # right or wrong
