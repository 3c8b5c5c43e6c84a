"""BabyLM 2025's entity tracking, wug and COMPS tasks, and the `--export babylm` prediction files.

Each fixture is written here in the official format, with the edge cases the rules hinge on
(a tie, a one-token completion, a multi-token word, a wug item whose ratio is 0, a malformed
line). Expected values come from simple one-item-at-a-time implementations of the pipeline's
rules written in this file (read_files.py `decode_*`, compute_results.py `rank_and_evaluate`
/ `rank_and_evaluate_wug`, run.py `process_results`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlmerge.config import TokenizerConfig, load_config
from vlmerge.evaluate.run import TaskResult, babylm_files, eval_command
from vlmerge.layout import babylm_predictions
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request, Scores, get_task
from vlmerge.precompute.tokenizer import train_bpe
from vlmerge.problems import ProblemLog

from test_scoring import official


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def story(prefix: str, options: list[str], numops: int) -> dict:
    return {"input_prefix": prefix, "options": options, "numops": numops, "sample_id": 0}


@pytest.fixture()
def fixtures(tmp_path) -> dict[str, Path]:
    """One folder per task, in the layout of BabyLM's evaluation_data/full_eval."""
    et = tmp_path / "entity_tracking"
    write_jsonl(et / "regular.jsonl", [
        story("Box 0 contains the apple. Box 0 contains", [" the apple.", " nothing.", " the hat."], 0),
        story("Box 1 contains the hat. Box 1 contains", [" the hat.", " the apple."], 0),
        story("Box 1 contains the hat. Move the hat into Box 2. Box 2 contains", [" the hat.", " nothing."], 1),
        '{"input_prefix": "Box 3 contains", "options": [" the cat."], "numops": 0}',  # one option: malformed
        "not json"])
    write_jsonl(et / "ambiref.jsonl", [story("Box 0 contains the box. It contains", [" the box.", " the boxes."], 2)])
    write_jsonl(et / "move_contents.jsonl", [story("Move the contents of Box 1 to Box 0. Box 0 contains",
                                                   [" the hat.", " nothing."], 1)])
    wa = tmp_path / "wug_adj_nominalization"
    write_jsonl(wa / "wug_adj_nominalization.jsonl", [
        {"sentences": "The wug is very tolable. Its tolability is clear.\tThe wug is very tolable. Its tolableness is clear.",
         "ratio": 0.7},
        {"sentences": "She is glorp. Her glorpity shows.\tShe is glorp. Her glorpness shows.", "ratio": 0},
        {"sentences": "It is blick. Its blickness.\tIt is blick. Its blickity.", "ratio": "0.25"},
        {"sentences": "It is dax. Its daxness.\tIt is dax. Its daxity.", "ratio": 0.9},
        {"sentences": "only one sentence", "ratio": 0.5},  # malformed: one candidate
        {"sentences": "a\tb", "ratio": "many"}])  # malformed ratio
    wp = tmp_path / "wug_past_tense"
    write_jsonl(wp / "wug_past_tense.jsonl", [
        {"sentences": "Yesterday he splinged.\tYesterday he splung.", "ratio": 0.6},
        {"sentences": "Yesterday she glinked.\tYesterday she glank.", "ratio": 0.2},
        {"sentences": "Yesterday we frinked.\tYesterday we frank.", "ratio": 0.0}])
    comps = tmp_path / "comps"
    write_jsonl(comps / "comps_base.jsonl", [
        {"prefix_acceptable": "A robin", "prefix_unacceptable": "A penguin", "property_phrase": "can fly."},
        {"prefix_acceptable": "A dog", "prefix_unacceptable": "A fish", "property_phrase": "barks."},
        {"prefix_acceptable": "A cat", "property_phrase": "purrs."}])  # malformed: no unacceptable prefix
    write_jsonl(comps / "comps_wugs.jsonl", [
        {"prefix_acceptable": "A wug is a robin. Therefore, a wug", "prefix_unacceptable": "A dax is a penguin. "
         "Therefore, a dax", "property_phrase": "can fly."}])
    write_jsonl(comps / "comps_wugs_dist-before.jsonl", [
        {"prefix_acceptable": "A wug is a dog. A dax is a fish. Therefore, a wug", "prefix_unacceptable":
         "A wug is a dog. A dax is a fish. Therefore, a dax", "property_phrase": "barks."}])
    write_jsonl(comps / "comps_wugs_dist-in_between.jsonl", [
        {"prefix_acceptable": "A wug is a dog. Therefore, a wug", "prefix_unacceptable": "A dax is a fish. "
         "Therefore, a dax", "property_phrase": "barks."}])
    return {"entity_tracking": et, "wug_adj": wa, "wug_past": wp, "comps": comps}


# --- the official decode_* rules, one raw line at a time ---------------------------------------------------------


def official_lines(task: str, folder: Path) -> list[tuple[str, list[tuple[str, str]], dict]]:
    """(UID, [(sentence, completion)], line) per well-formed line, as read_files.py builds them."""
    out = []
    for file in sorted(folder.glob("*.jsonl")):
        for raw in file.read_text().splitlines():
            try:
                d = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if task == "entity_tracking" and len(d["options"]) >= 2:
                out.append((f"{file.stem}_{d['numops']}_ops", [(d["input_prefix"] + o, o) for o in d["options"]], d))
            elif task.startswith("wug") and "\t" in d["sentences"] and d["ratio"] != "many":
                out.append((task, [(s, s) for s in d["sentences"].split("\t")], d))
            elif task == "comps" and "prefix_unacceptable" in d:
                uid = {"comps_base": "base", "comps_wugs": "wugs", "comps_wugs_dist-before": "wugs_dist_before"}.get(
                    file.stem, "wugs_dist_in_between")
                out.append((uid, [(d[p] + " " + d["property_phrase"], d["property_phrase"])
                                  for p in ("prefix_acceptable", "prefix_unacceptable")], d))
    return out


def first_argmax(values: list[float]) -> int:
    best = 0
    for k, v in enumerate(values):
        if v > values[best]:
            best = k
    return best


def ranks(x: list[float]) -> list[float]:
    """Average ranks, 1-based (ties share the mean of their positions)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def reference_metric(task: str, lines, logprobs: list[list[float]]) -> dict[str, float]:
    """The pipeline's task-level numbers from per-candidate scores, item by item."""
    if task.startswith("wug"):
        probs = [math.exp(lp[0]) / sum(math.exp(v) for v in lp) for lp in logprobs]
        return {"": spearman(probs, [float(d["ratio"]) for _, _, d in lines])}
    hits: dict[str, list[int]] = {}
    for (uid, _, _), lp in zip(lines, logprobs):
        hits.setdefault(uid, []).append(first_argmax(lp) == 0)
    acc = {uid: sum(h) / len(h) for uid, h in hits.items()}
    if task == "entity_tracking":
        splits = [[a for u, a in acc.items() if u.startswith(s)] for s in ("regular", "ambiref", "move_contents")]
        split_acc = [sum(s) / len(s) for s in splits if s]
        return {**acc, "": sum(split_acc) / len(split_acc)}
    return {**acc, "": sum(acc.values()) / len(acc)}


def chosen_scores(lines) -> list[list[float]]:
    """Scores the test chooses: item 0 has a tie between its right option and another; the others are distinct."""
    rng = np.random.default_rng(7)
    out = [[float(v) for v in -rng.uniform(1, 6, len(c))] for _, c, _ in lines]
    out[0][1] = out[0][0]
    return out


@pytest.mark.parametrize("task", ["entity_tracking", "wug_adj", "wug_past", "comps"])
def test_task_reads_official_format_and_matches_reference(task, fixtures):
    t, problems = get_task(task), ProblemLog()
    items = t.load(fixtures[task], problems)
    lines = official_lines(task, fixtures[task])
    reqs = t.requests(items)
    # the requests are the pipeline's (sentence, completion) pairs, in its order
    assert [(r.context + r.target, r.target) for r in reqs] == [sc for _, cands, _ in lines for sc in cands]
    bad = {"entity_tracking": 2, "wug_adj": 2, "wug_past": 0, "comps": 1}[task]
    assert len(problems) == bad and all(":" in where for where, _ in problems.items)
    lp = chosen_scores(lines)
    metrics, per_item = t.evaluate(items, Scores(np.array([v for x in lp for v in x]), np.ones(len(reqs), np.int64)))
    got = {m.subtask: m.value for m in metrics if not m.subtask.startswith("split:")}
    want = reference_metric(task, lines, lp)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_tie_counts_as_correct_and_wug_ratio_zero(fixtures):
    et = get_task("entity_tracking")
    items = et.load(fixtures["entity_tracking"], ProblemLog())
    # files in sorted order (ambiref, move_contents, regular); regular's first story: a tie of the right option
    lp = np.array([-2.0, -1.0, -2.0, -1.0, -1.0, -1.0, -3.0, -2.0, -1.0, -2.0, -1.0])
    _, per_item = et.evaluate(items, Scores(lp, np.ones(len(lp), np.int64)))
    assert [i.value for i in per_item] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert [i.item_id for i in per_item] == ["ambiref_2_ops_0", "move_contents_1_ops_0", "regular_0_ops_0",
                                             "regular_0_ops_1", "regular_1_ops_0"]
    wug = get_task("wug_adj")
    items = wug.load(fixtures["wug_adj"], ProblemLog())
    assert [it.ratio for it in items] == [0.7, 0.0, 0.25, 0.9]
    # a perfectly ordered model: ρ = 1, and the ratio-0 item gets the smallest probability
    lp = np.array([-1.0, -2.0, -5.0, -1.0, -3.0, -2.0, -0.5, -2.0])
    metrics, per_item = wug.evaluate(items, Scores(lp, np.ones(8, np.int64)))
    assert metrics[0].metric == "spearman" and metrics[0].value == pytest.approx(1.0) and metrics[0].n == 4
    assert per_item[1].value == pytest.approx(1 / (1 + math.e ** 4))


# --- with a real model: the Scorer's decisions equal the official rule one item at a time ----------------------


def make_tiny_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random 1-layer Llama and a BPE trained on the fixtures' words (its tokenizer adds no BOS)."""
    words = ("Box contains the apple nothing hat Move into It box boxes contents of to A robin penguin can fly dog "
             "fish barks cat purrs wug is a Therefore dax Yesterday he splinged splung she glinked glank we frinked "
             "frank The very tolable Its tolability clear tolableness She glorp Her glorpity shows glorpness blick "
             "blickness blickity daxness daxity 0 1 2 .").split()
    tok = train_bpe([" ".join(words)] * 3, TokenizerConfig(vocab_size=400), progress=False)
    torch.manual_seed(1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    return lm, tok


@pytest.fixture(scope="module")
def tiny_lm():
    return make_tiny_lm()


@pytest.mark.parametrize("task", ["entity_tracking", "wug_adj", "wug_past", "comps"])
def test_scorer_on_fixtures_equals_official_one_item_at_a_time(task, fixtures, tiny_lm):
    lm, tok = tiny_lm
    t = get_task(task)
    items = t.load(fixtures[task], ProblemLog())
    got = Scorer(lm, tok).score(t.requests(items)).logprob
    lines = official_lines(task, fixtures[task])
    want = [[official(lm, tok, s, c) for s, c in cands] for _, cands, _ in lines]
    np.testing.assert_allclose(got, [v for x in want for v in x], atol=1e-5, rtol=0)
    # a multi-token word ("splinged") and a one-token completion are both in the fixtures
    assert len(tok(" splinged", add_special_tokens=False)["input_ids"]) > 1


# --- `eval --export babylm` ------------------------------------------------------------------------------------


def test_export_babylm_writes_prediction_files_the_pipeline_reads(fixtures, tiny_lm, tmp_path):
    lm, tok = tiny_lm
    model_dir = tmp_path / "model"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = load_config(None, [f"paths.root={tmp_path / 'root'}"])
    specs = [f"{name}={path}" for name, path in fixtures.items()]
    export = tmp_path / "export"
    results = eval_command(cfg, model_dir, specs, dtype="fp32", features=None, out=tmp_path / "eval", export=export)
    files = sorted(p.relative_to(export).as_posix() for p in export.rglob("*.json"))
    assert files == ["zero_shot/causal/comps/comps/predictions.json",
                     "zero_shot/causal/entity_tracking/entity_tracking/predictions.json",
                     "zero_shot/causal/wug_adj/wug_adj_nominalization/predictions.json",
                     "zero_shot/causal/wug_past/wug_past_tense/predictions.json"]
    et = json.loads((export / files[1]).read_text())
    assert sorted(et) == ["ambiref_2_ops", "move_contents_1_ops", "regular_0_ops", "regular_1_ops"]
    assert [p["id"] for p in et["regular_0_ops"]["predictions"]] == ["regular_0_ops_0", "regular_0_ops_1"]
    # each pred is the option the model scores highest (first on a tie), as the pipeline's arg-max
    lines = official_lines("entity_tracking", fixtures["entity_tracking"])
    by_uid: dict[str, list[str]] = {}
    for uid, cands, _ in lines:
        scores = [official(lm, tok, s, c) for s, c in cands]
        by_uid.setdefault(uid, []).append(cands[first_argmax(scores)][1])
    assert {u: [p["pred"] for p in v["predictions"]] for u, v in et.items()} == by_uid
    wug = json.loads((export / files[2]).read_text())
    assert list(wug) == ["wug_adj"] and [p["id"] for p in wug["wug_adj"]["predictions"]][-1] == "wug_adj_3"
    assert all(0 < p["prob"] < 1 for p in wug["wug_adj"]["predictions"])
    comps = json.loads((export / files[0]).read_text())
    assert comps["base"]["predictions"][0]["pred"] in ("A robin can fly.", "A penguin can fly.")
    assert {r.task for r in results} == set(fixtures)


# --- reading -----------------------------------------------------------------------------------------------------

EYE = ["RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound"]


def reading_csv(path: Path, n: int = 60) -> Path:
    """A reading_data.csv of `n` words in 6 texts, with empty measures, two malformed rows and a long word."""
    rng = np.random.default_rng(3)
    words = ["the", "dog", "ran", "to", "a", "house", "splinged", "and", "it", "was"]
    rows, text = [], []
    for k in range(n):
        if k % 10 == 0:
            text = []
        word = words[k % len(words)]
        item, prev = " ".join(text), (text[-1] if text else "")
        prev_item = " ".join(text[:-1]) if text else ""
        freq, length = float(rng.uniform(1, 5)), len(word)
        rt = {m: f"{200 + 30 * length - 20 * freq + rng.normal(0, 25):.3f}" for m in EYE}
        rt["self_paced_reading_time"] = f"{300 + 10 * length + rng.normal(0, 30):.3f}"
        if k % 7 == 3:
            rt["RTgopast"] = ""  # not measured
        rows.append({"item": item, "word": word, "prev_item": prev_item, "prev_word": prev, **rt,
                     "ELAN": "0.1", "Subtlex_log10": f"{freq:.4f}", "length": str(length),
                     "context_length": str(len(text)), "prev_length": str(len(prev)) if text else ""})
        text.append(word)
    rows[5]["length"] = "long"  # malformed: not a number
    rows[8]["word"] = ""  # malformed: no word
    header = list(rows[0])
    path.write_text(",".join(header) + "\n" + "".join(",".join(r[h] for h in header) + "\n" for r in rows))
    return path


def ols_r2(y: np.ndarray, columns: list[np.ndarray]) -> float:
    """R² of least squares with an intercept, by numpy."""
    x = np.column_stack([np.ones(len(y)), *columns])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    return 1 - resid @ resid / ((y - y.mean()) @ (y - y.mean()))


def reference_gain(rows: list[dict], dv: str, names: list[str]) -> float:
    """Relative R² gain of adding surprisal, each model on its own complete rows (pairwise interactions)."""
    def r2(cols: list[str]) -> float:
        ok = [r for r in rows if all(not math.isnan(r[c]) for c in [dv, *cols])]
        base = [np.array([r[c] for r in ok]) for c in names]
        inter = [base[i] * base[j] for i in range(len(names)) for j in range(i + 1, len(names))]
        extra = [np.array([r["pred"] for r in ok])] if "pred" in cols else []
        return ols_r2(np.array([r[dv] for r in ok]), base + inter + extra)
    without, with_ = r2(names), r2([*names, "pred"])
    return (with_ - without) / (1 - without)


def test_reading_matches_an_independent_r2_gain(tmp_path):
    path = reading_csv(tmp_path / "reading_data.csv")
    t, problems = get_task("reading"), ProblemLog()
    words = t.load(path, problems)
    assert len(words) == 58 and [w for w, _ in problems.items] == [f"{path}:7", f"{path}:10"]
    reqs = t.requests(words)
    # an empty item is read as "None" and an empty prev_item means no previous word, as pandas does for the pipeline
    assert reqs[:2] == [Request("the", "None", None, 0, True), Request("dog", "the", None, 1, True)]  # by subword
    rng = np.random.default_rng(5)
    lp = -rng.uniform(1, 12, len(reqs))
    metrics, per_item = t.evaluate(words, Scores(lp, np.ones(len(reqs), np.int64)))
    got = {(m.subtask, m.metric): m.value for m in metrics}
    # the reference: rows as dicts, surprisal = −log p of the word's own request, the previous word's next to it
    df = __import__("pandas").read_csv(path, keep_default_na=True)
    rows, i = [], 0
    for k in range(len(df)):
        if k in (5, 8):
            continue
        r = {c: float(df.loc[k, c]) for c in [*EYE, "self_paced_reading_time", "Subtlex_log10", "length",
                                               "context_length", "prev_length"]}
        r["pred"], i = -lp[i], i + 1
        if isinstance(df.loc[k, "prev_item"], str):
            r["prev_pred"], i = -lp[i], i + 1
        else:
            r["prev_pred"] = math.nan
        rows.append(r)
    base = ["Subtlex_log10", "length", "context_length"]
    for dv in EYE:
        assert got[(dv, "r2_gain")] == pytest.approx(100 * reference_gain(rows, dv, base), abs=1e-9)
    assert got[("", "eye_tracking")] == pytest.approx(np.mean([got[(dv, "r2_gain")] for dv in EYE]), abs=1e-12)
    spr = 100 * reference_gain(rows, "self_paced_reading_time", [*base, "prev_length", "prev_pred"])
    assert got[("", "self_paced_reading")] == pytest.approx(spr, abs=1e-9)
    assert per_item[0].value == pytest.approx(-lp[0])
    # its predictions.json: reading/run.py's rows, in the task's folder (no dataset level)
    scores = Scores(lp, np.ones(len(reqs), np.int64))
    files = babylm_files([TaskResult("reading", metrics, per_item, t.predict(words, scores), "reading", "reading")])
    rows = files[("reading", "reading")]["reading"]["predictions"]
    assert rows[0]["id"] == 0 and rows[0]["pred"] == -lp[0] and math.isnan(rows[0]["prev_pred"])
    assert rows[6]["id"] == 7 and rows[6]["pred"] == per_item[6].value  # rows 5 and 8 (malformed) are left out
    assert babylm_predictions(tmp_path, "reading", "reading") == tmp_path / "zero_shot/causal/reading/predictions.json"


def get_p2(lm, tok, sentence: str, word: str) -> float:
    """reading/evaluation_functions.py `get_p2`, one word at a time, as log p: the first subword after
    the sentence, then each next one after the sentence + the decoded subwords, retokenised."""
    def next_logp(sentence: str, token: int) -> float:
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([tok(sentence)["input_ids"]])).logits[0, -1]
        return logits.log_softmax(-1)[token].item()

    target = tok(word, add_special_tokens=False)["input_ids"]
    total, sentence = next_logp(sentence, target[0]), sentence + tok.decode(target[0])
    for token in target[1:]:
        piece = tok.decode(token)
        total += next_logp(sentence, tok(piece, add_special_tokens=False)["input_ids"][0])
        sentence += piece
    return total


def appended(lm, tok, sentence: str, word: str) -> float:
    """The word's own tokens appended to the sentence's: what the pipeline's rule is not."""
    ctx = tok(sentence)["input_ids"]
    ids = ctx + tok(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = lm(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
    return sum(logp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids)))


def test_reading_word_surprisal_is_the_pipelines_get_p2(tmp_path, tiny_lm):
    lm, tok = tiny_lm
    words = get_task("reading").load(reading_csv(tmp_path / "reading_data.csv", 12), ProblemLog())
    # beside the file's words: subwords that merge across the join and a split UTF-8 character
    extra = [reading_word(len(words) + k, item, word) for k, (item, word) in
             enumerate([("I saw", "them"), ("a", "naïve"), ("the dog", "boxes"), ("", "ïï")])]
    words = words[:4] + extra
    got = Scorer(lm, tok).score(get_task("reading").requests(words)).logprob
    pairs = [pair for w in words for pair in [(w.item, w.word), *([w.prev] if w.prev else [])]]
    want = [get_p2(lm, tok, item, word) for item, word in pairs]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # these words are where the rule matters: the appended tokens would score them otherwise
    differ = [word for (item, word), w in zip(pairs, want) if abs(appended(lm, tok, item, word) - w) > 1e-3]
    assert {"them", "naïve", "ïï"} <= set(differ)
    assert any("\ufffd" in tok.decode(t) for t in tok("ïï", add_special_tokens=False)["input_ids"])  # a partial character


def reading_word(index: int, item: str, word: str):
    """One reading row's word (no previous word), for the scorer."""
    from vlmerge.evaluate.tasks.reading import NUMERIC, Word

    return Word(index, item or "None", word, None, dict.fromkeys(NUMERIC, 1.0))


# --- age of acquisition ------------------------------------------------------------------------------------------


def test_aoa_reads_words_and_scores_each_context(tmp_path):
    path = tmp_path / "cdi_childes.json"
    path.write_text(json.dumps({"dog": [{"context": " I saw a "}, {"context": "the big"}], "a": [{"context": "x"}],
                                "cat": "not a list", "ball": [{"context": "kick the"}]}))
    t, problems = get_task("aoa"), ProblemLog()
    words = t.load(path, problems)
    assert [w.word for w in words] == ["dog", "ball"] and [w for w, _ in problems.items] == [f"{path}:cat"]
    reqs = t.requests(words)
    # AoA_word's causal rule: context.strip() + " " + word, the word's tokens scored
    assert [(r.context, r.target) for r in reqs] == [("I saw a ", "dog"), ("the big ", "dog"), ("kick the ", "ball")]
    metrics, items = t.evaluate(words, Scores(np.array([-2.0, -4.0, -6.0]), np.ones(3, np.int64)))
    assert metrics[0].value == pytest.approx(4.0) and [i.item_id for i in items] == ["dog/0", "dog/1", "ball/0"]


def logistic(x, a, b, c, d):
    return a / (1 + math.exp(-b * (x - c))) + d


def test_aoa_sigmoid_crossings_and_pearson_equal_hand_computed_values():
    from vlmerge.evaluate.tasks.aoa import CHANCE, aoa_fitness, child_aoa, model_aoa

    # a child curve with a known midpoint: 0.5 is crossed at c (a = 1, d = 0)
    ages = np.arange(16, 31, dtype=float)
    assert child_aoa(np.array([logistic(x, 1.0, 0.6, 21.3, 0.0) for x in ages])) == pytest.approx(21.3, abs=1e-4)
    assert child_aoa(np.array([0.1, np.nan] + [np.nan] * 13)) is None  # fewer than 3 points
    # a model curve: −surprisal = logistic(log10(words + 1)); its crossing of −(half way from chance to the minimum)
    steps = np.array([0, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8])
    a, b, c, d = 12.0, 1.5, 4.0, -20.0
    s = np.array([-logistic(math.log10(x + 1), a, b, c, d) for x in steps])
    threshold = CHANCE - 0.5 * (CHANCE - s.min())
    want = c - math.log(a / (-threshold - d) - 1) / b
    assert model_aoa(steps, s) == pytest.approx(want, abs=1e-4)
    # Pearson r over the words that have both AoAs; a word missing from the CDI table is left out
    mids = {"w1": (2.5, 20.0), "w2": (3.5, 23.0), "w3": (4.0, 22.0), "w4": (5.0, 27.0)}
    series = {w: (steps, np.array([-logistic(math.log10(x + 1), a, b, mc, d) for x in steps])) for w, (mc, _) in mids.items()}
    series["w5"] = series["w1"]
    cdi = {w: np.array([logistic(x, 1.0, 0.6, ca, 0.0) for x in ages]) for w, (_, ca) in mids.items()}
    r, n = aoa_fitness(series, cdi)
    m = [model_aoa(steps, series[w][1]) for w in mids]
    h = [ca for _, ca in mids.values()]
    mm, mh = sum(m) / 4, sum(h) / 4
    ref = sum((x - mm) * (y - mh) for x, y in zip(m, h)) / math.sqrt(sum((x - mm) ** 2 for x in m) * sum((y - mh) ** 2 for y in h))
    assert n == 4 and r == pytest.approx(ref, abs=1e-6)
    assert aoa_fitness({w: series[w] for w in ("w1", "w2")}, cdi) == (0.0, 2)  # fewer than 3 words, as the pipeline


def test_aoa_command_over_a_checkpoint_series(tmp_path, tiny_lm):
    from vlmerge.evaluate.run import aoa_command

    lm, tok = tiny_lm
    ckpts = []
    for k, words in enumerate((0, 1000, 20000)):
        d = tmp_path / "run" / "checkpoints" / f"words-{words:012d}"
        torch.manual_seed(k)
        LlamaForCausalLM(lm.config).save_pretrained(d)
        tok.save_pretrained(d)
        ckpts.append(d)
    words = tmp_path / "cdi_childes.json"
    words.write_text(json.dumps({"dog": [{"context": "Box contains the"}], "cat": [{"context": "A"}]}))
    cdi = tmp_path / "cdi.csv"
    cdi.write_text("word," + ",".join(map(str, range(16, 31))) + "\n" +
                   "dog," + ",".join(f"{logistic(x, 1, 0.6, 20, 0):.4f}" for x in range(16, 31)) + "\n")
    cfg = load_config(None, [f"paths.root={tmp_path / 'root'}"])
    out = aoa_command(cfg, ckpts[::-1], words, cdi, dtype="fp32", out=tmp_path / "aoa.json")
    assert json.loads((tmp_path / "aoa.json").read_text()) == out
    assert out["words_seen"] == [0, 1000, 20000] and out["metric"] == "pearson" and out["n_words"] <= 1


def test_aoa_without_words_or_sweep_results_is_a_one_line_error(tmp_path, capsys):
    from vlmerge.cli import main

    cdi = tmp_path / "cdi.csv"
    cdi.write_text("word," + ",".join(map(str, range(16, 31))) + "\n")
    common = ["--cdi", str(cdi), "--out", str(tmp_path / "aoa.json"), f"paths.root={tmp_path}"]
    assert main(["aoa", *common]) == 2
    assert "--words is required (BabyLM's cdi_childes.json), unless --sweep" in capsys.readouterr().err
    assert main(["aoa", "--sweep", *common]) == 2
    assert "no aoa item scores; put aoa in sweep.tasks" in capsys.readouterr().err
    assert not (tmp_path / "aoa.json").exists()


def test_aoa_over_each_sweep_series_equals_the_fit_of_its_own_points(tmp_path):
    # The sweep stores every model's per-item surprisals; `vlmerge aoa --sweep` fits one series per twin
    # and per merge setting (method, parameters, α) over the checkpoints. Planted: two series whose
    # words reach half way at known points, three words in the CDI table, one word not in it.
    from vlmerge.evaluate.run import aoa_sweep_command
    from vlmerge.evaluate.tasks.aoa import child_aoa, model_aoa
    from vlmerge.layout import result_file
    from vlmerge.results import ITEMS_SCHEMA, ModelKey, write_rows

    cfg = load_config(None, [f"paths.root={tmp_path}"])
    steps = [10, 100, 1_000, 10_000, 100_000, 1_000_000]
    ages = range(16, 31)
    child = {"dog": 20.0, "cat": 23.0, "ball": 21.0, "cup": 26.0}
    cdi = tmp_path / "cdi.csv"
    proportions = {w: [float(f"{logistic(x, 1, 0.6, c, 0):.6f}") for x in ages] for w, c in child.items()}
    cdi.write_text("word," + ",".join(map(str, ages)) + "\n" +
                   "".join(f"{w}," + ",".join(map(str, p)) + "\n" for w, p in proportions.items()))
    child = {w: child_aoa(np.array(p)) for w, p in proportions.items()}  # the planted ages, from rounded shares
    midpoints = {  # a series -> the log10(words) at which each word's −surprisal rises
        ModelKey("demo", "text", "", None, None, "none", 1.0): {"dog": 2.0, "cat": 3.5, "ball": 2.8, "cup": 4.5, "zzz": 3.0},
        ModelKey("demo", "text", "multimodal", None, None, "linear", 0.5): {"dog": 3.0, "cat": 2.5, "ball": 4.0, "cup": 3.2},
    }

    def surprisal(mid: float, seen: int, k: int) -> float:
        return -logistic(math.log10(seen + 1), 12.0, 1.5 + 0.1 * k, mid, -20.0)

    rows = []
    for key, words in midpoints.items():
        for seen in steps:
            at = dataclasses.replace(key, text_words=seen, mm_words=None if key.method == "none" else seen)
            rows += [{**at.columns(f"item-{seen}"), "task": "aoa", "subtask": "", "example_id": f"{w}/{k}",
                      "value": surprisal(mid, seen, k)} for w, mid in words.items() for k in range(2)]
    rows.append({**rows[0], "task": "blimp"})  # another task's items are not read
    write_rows(rows, ITEMS_SCHEMA, result_file(cfg.layout.results_dir, "items", "planted"))

    series = aoa_sweep_command(cfg, cdi, out=tmp_path / "aoa.json")
    assert json.loads((tmp_path / "aoa.json").read_text()) == series
    assert [(s["method"], s["alpha"], s["words_seen"]) for s in series] == [("none", 1.0, steps), ("linear", 0.5, steps)]
    for s, words in zip(series, midpoints.values()):
        model = {w: model_aoa(np.repeat(np.array(steps, float), 2),
                              np.array([surprisal(mid, seen, k) for seen in steps for k in range(2)]))
                 for w, mid in words.items() if w in child}
        pairs = [(m, child[w]) for w, m in model.items() if m is not None]
        assert s["n_words"] == len(pairs) >= 3
        assert s["value"] == pytest.approx(np.corrcoef(np.array(pairs).T)[0, 1], abs=1e-9)
