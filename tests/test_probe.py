"""The mergeability probe, its predictor and the adaptive search: the maths by hand and against
statsmodels, the signals against a one-sequence-at-a-time loss, and the search through the sweep."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, SMALL_WORLD
from vlmerge.cli import main
from vlmerge.config import load_config
from vlmerge.layout import list_checkpoints
from vlmerge.predict import Outcome, Predictor, Target, best_alpha, fit, first_alphas, multimodal_targets, next_alphas
from vlmerge.results import read_results

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
NINE = [i / 8 for i in range(9)]


def test_the_fitted_line_and_its_prediction_interval_equal_statsmodels_ols():
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2))
    y = 0.5 + x @ [2.0, -1.0] + rng.normal(scale=0.1, size=12)
    new = np.array([[0.3, -0.2], [1.5, 2.0]])
    mean, low, high = fit(x, y).predict(new, level=0.9)
    frame = sm.OLS(y, sm.add_constant(x)).fit().get_prediction(sm.add_constant(new, has_constant="add")).summary_frame(alpha=0.1)
    np.testing.assert_allclose(mean, frame["mean"], rtol=1e-10)
    np.testing.assert_allclose(low, frame["obs_ci_lower"], rtol=1e-10)
    np.testing.assert_allclose(high, frame["obs_ci_upper"], rtol=1e-10)
    exact = fit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([3.0, 2.0, 4.0]))  # y = 1 + 2a + b
    np.testing.assert_allclose(exact.coef, [1.0, 2.0, 1.0], atol=1e-12)
    assert np.isinf(exact.predict(np.array([[2.0, 2.0]]))[2]).all()  # no residual degrees of freedom: no bound


def test_the_best_alpha_is_the_analysis_rule_highest_score_within_tolerance_ties_to_the_smaller():
    o = {0.0: Outcome(0.60, 0.00), 0.25: Outcome(0.70, 0.01), 0.5: Outcome(0.70, 0.02), 0.75: Outcome(0.90, 0.30)}
    assert best_alpha(o, 0.05) == 0.25  # 0.75 scores best but loses too much grounding; 0.25 ties 0.5
    assert best_alpha(o, 0.5) == 0.75
    assert best_alpha({0.5: Outcome(0.7, 0.2)}, 0.05) is None


def predicted(scores, drops, width=0.02):
    return {a: Outcome(s, d, s + width, d - width) for a, s, d in zip(GRID, scores, drops)}


def test_the_search_evaluates_the_predicted_best_and_neighbours_then_follows_the_measurements():
    guess = predicted([0.5, 0.6, 0.7, 0.65, 0.8], [0.0, 0.01, 0.02, 0.03, 0.2])
    first = first_alphas(GRID, guess, 0.05)
    assert first == [0.5, 0.25, 0.75]  # predicted best (1.0 is out of tolerance) and its neighbours
    # measured: 0.75 is in fact the best: its neighbour 1.0 comes next (the prediction was off)
    measured = {0.5: Outcome(0.7, 0.02), 0.25: Outcome(0.6, 0.01), 0.75: Outcome(0.75, 0.03)}
    assert next_alphas(GRID, measured, guess, 0.05, budget=1.0) == [1.0]
    measured[1.0] = Outcome(0.8, 0.2)  # out of tolerance: 0.75 stays best, its neighbours are measured
    # with the budget left, an α whose interval could still beat 0.75 is evaluated: none can (0.0: 0.52)
    assert next_alphas(GRID, measured, guess, 0.05, budget=1.0) == []
    hopeful = guess | {0.0: Outcome(0.5, 0.0, 0.9, 0.0)}  # a wide interval that could beat it
    assert next_alphas(GRID, measured, hopeful, 0.05, budget=1.0) == [0.0]
    assert next_alphas(GRID, measured, hopeful, 0.05, budget=0.8) == []  # a fifth evaluation would leave the budget (0.8 of 5)
    # nothing within tolerance: only an α whose interval reaches the tolerance is tried, the smallest drop first
    lossy = predicted([0.5, 0.6, 0.7, 0.8, 0.9], [0.10, 0.06, 0.2, 0.3, 0.4])
    assert first_alphas(GRID, lossy, 0.05) == [0.25, 0.0, 0.5]
    tried = {a: Outcome(0.6, 0.1) for a in (0.25, 0.0, 0.5)}
    assert next_alphas(GRID, tried, lossy, 0.05, budget=1.0) == []  # the others cannot be within: done


def test_the_predictor_reads_each_kind_of_task_from_its_signal_and_orients_lower_is_better():
    def rows(lm, caption, blimp, vqa, ppl):
        return [{"task": "probe", "subtask": "", "metric": "lm_loss", "value": lm},
                {"task": "probe", "subtask": "", "metric": "caption_loss", "value": caption},
                {"task": "blimp", "subtask": "", "metric": "accuracy", "value": blimp},
                {"task": "vqa", "subtask": "", "metric": "accuracy", "value": vqa},
                {"task": "perplexity", "subtask": "", "metric": "perplexity", "value": ppl}]

    # exact lines: blimp = 1 − lm/10 (text: the LM loss), vqa = 0.9 − caption/10 and perplexity = 5·caption
    # (multimodal: the caption loss)
    twins = [rows(lm, c, 1 - lm / 10, 0.9 - c / 10, 5 * c) for lm, c in [(3, 8), (2.5, 1), (2, 6), (1.5, 2), (4, 4)]]
    p = Predictor.fitted(Target("blimp", "accuracy"), multimodal_targets({"vqa": "accuracy", "perplexity": "perplexity"}),
                         twins)
    text_twin, mm_twin = rows(2, 8, 0.8, 0.2, 40), rows(2.2, 1, 0.78, 0.8, 22)
    merge = rows(2.1, 3, 0.70, 0.45, 25)
    out = p.predicted(merge, (text_twin, mm_twin))
    assert out.score == pytest.approx(0.79, abs=1e-9)  # 1 − 2.1/10, whatever the merge measured
    # predicted: vqa 0.9 − 0.3 = 0.6 against the better twin's 0.8: 0.2; perplexity 15 against 22 (lower is
    # better, oriented −15 against −22): −7, a gain
    assert out.mm_drop == pytest.approx(0.2, abs=1e-9)
    assert out.score_high == pytest.approx(out.score, abs=1e-9)  # exact lines: no residual, an interval of no width
    # measured: vqa 0.8 − 0.45 = 0.35, perplexity −22 − (−25) = 3
    assert p.measured(merge, (text_twin, mm_twin)) == Outcome(0.70, pytest.approx(3.0))


def test_probe_signals_equal_a_one_sequence_at_a_time_loss(twins):
    from vlmerge.evaluate.probe import ProbeSet, signals
    from vlmerge.evaluate.run import load_model

    cfg = load_config(None, [f"paths.root={twins}", *SMALL_WORLD, "sweep.probe_lines=8"])
    probe = ProbeSet.load(cfg)
    assert probe.lines == 8
    groups = torch.cat(probe.groups)
    feats = torch.cat([b["pixel_values"] for b in probe.batches])
    ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, 64 - b["input_ids"].shape[1])) for b in probe.batches])
    assert torch.equal(ids[groups == 1], ids[groups == 2])  # the same captions…
    assert not any(torch.equal(a, b) for a, b in zip(feats[groups == 1], feats[groups == 2]))  # …each with another's image
    model, _ = load_model(list_checkpoints(twins / "runs/demo/multimodal")[-1], "cpu")
    got = signals(model, probe, "the multimodal twin")

    def by_hand(group: int) -> float:
        total = count = 0
        for b, g in zip(probe.batches, probe.groups):
            for i in torch.nonzero(g == group).flatten().tolist():
                keep = b["attention_mask"][i].bool()
                ids, labels = b["input_ids"][i][keep], b["labels"][i][keep]
                with torch.no_grad():
                    logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                   pixel_values=b["pixel_values"][i: i + 1]).logits[0]
                logp = torch.log_softmax(logits.double(), -1)
                for t in range(1, len(ids)):
                    if labels[t] != -100:
                        total, count = total - float(logp[t - 1, ids[t]]), count + 1
        return total / count

    assert got["lm_loss"] == pytest.approx(by_hand(0), rel=1e-5)
    assert got["caption_loss"] == pytest.approx(by_hand(1), rel=1e-5)
    assert got["grounding"] == pytest.approx(by_hand(2) - by_hand(1), abs=1e-5)
    assert got["grounding"] > 0  # the multimodal twin reads its images


def test_the_adaptive_sweep_probes_every_alpha_and_evaluates_fewer(twins, tmp_path, capsys):
    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    common = [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, "sweep.tasks=[blimp, vqa]", "sweep.probe_lines=16",
              "sweep.methods=[{name: linear}]", f"sweep.alphas={NINE}",
              "analysis.multimodal_tasks={vqa: accuracy}", "analysis.tolerance=0.05"]
    text, mm = (list_checkpoints(root / f"runs/demo/{run}")[-1] for run in ("text", "multimodal"))
    assert main(["probe", "--text", str(text), "--mm", str(mm), "--alpha", "0,1", "--out", str(tmp_path / "p.json"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "grounding" in out and "distances (model)" in out
    signals = json.loads((tmp_path / "p.json").read_text())["signals"]
    assert [s["alpha"] for s in signals] == [0.0, 1.0] and signals[0]["grounding"] > signals[1]["grounding"]

    assert main(["sweep", "run", "--quiet", "sweep.search=adaptive", *common]) == 0
    rows = read_results(root / "results/demo")
    merged = rows[rows.method == "linear"]
    pairs = merged.groupby(["text_words", "mm_words"])
    assert len(pairs) == 3
    for _, part in pairs:
        assert sorted(set(part[part.task == "probe"].alpha)) == NINE
        evaluated = sorted(set(part[part.task == "blimp"].alpha))
        assert 2 <= len(evaluated) < 9  # the predicted best and its neighbours, refined: not the whole grid
    twins_scored = rows[(rows.method == "none") & (rows.task == "probe")]
    checkpoints = [c for run in ("text", "multimodal") for c in list_checkpoints(root / f"runs/demo/{run}")
                   if not c.name.endswith("000000000000")]  # every checkpoint of both runs but step 0
    assert len(twins_scored.drop_duplicates(["text_run", "mm_run", "text_words", "mm_words"])) == len(checkpoints)
    assert main(["sweep", "run", "--quiet", "sweep.search=adaptive", *common]) == 0  # done: skipped
    assert "0 item(s) run" in capsys.readouterr().out


def test_the_report_compares_the_probe_with_the_full_grid_by_the_analysis_own_rules(twins, tmp_path):
    from vlmerge.analysis.load import load
    from vlmerge.analysis.probe import probe_tables
    from vlmerge.analysis.run import compute
    from vlmerge.predict import PROBE

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    overrides = [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, "sweep.tasks=[blimp, vqa]", "sweep.probe_lines=16",
                 "sweep.methods=[{name: linear}]", "sweep.alphas=[0.0, 0.25, 0.5, 0.75, 1.0]", "sweep.probe=true",
                 "sweep.distances=false", "analysis.multimodal_tasks={vqa: accuracy}", "analysis.tolerance=0.05",
                 "analysis.bootstrap=0"]
    assert main(["sweep", "run", "--quiet", *overrides]) == 0
    cfg = load_config(None, overrides)
    results = load([root / "results/demo"])
    drops, choices = probe_tables(results.metrics, cfg.analysis)
    # the grid's best α is the analysis's own (tables.best_alpha), pair by pair
    best = compute(results, cfg.analysis).best
    best = best[best.task == "blimp"].set_index("mm_words").best_alpha
    assert len(choices) == len(best) == 3
    for _, c in choices.iterrows():
        assert (c.grid_best if c.grid_best is not None else np.nan) == pytest.approx(best[c.mm_words], nan_ok=True)
    # a predicted drop: the better twin's score minus the line fitted on the twins (numpy's polyfit) at the merge's loss
    m = results.metrics
    twin_rows = m[m.method == "none"]
    lm = twin_rows[(twin_rows.task == PROBE) & (twin_rows.metric == "lm_loss")].set_index(["text_run", "text_words", "mm_words"]).value
    acc = twin_rows[(twin_rows.task == "blimp") & (twin_rows.subtask == "")].set_index(["text_run", "text_words", "mm_words"]).value
    slope, intercept = np.polyfit(lm.to_numpy(), acc.reindex(lm.index).to_numpy(), 1)
    row = drops[(drops.task == "blimp") & (drops.alpha == 0.5)].iloc[0]
    merge = m[(m.method == "linear") & (m.alpha == 0.5) & (m.mm_words == row.mm_words)]
    loss = merge[(merge.task == PROBE) & (merge.metric == "lm_loss")].value.iloc[0]
    score = merge[(merge.task == "blimp") & (merge.subtask == "")].value.iloc[0]
    twins_here = twin_rows[(twin_rows.task == "blimp") & (twin_rows.subtask == "") &
                           ((twin_rows.text_words == row.text_words) | (twin_rows.mm_words == row.mm_words))]
    better = twins_here.value.max()
    assert row.predicted_drop == pytest.approx(better - (intercept + slope * loss), abs=1e-9)
    assert row.measured_drop == pytest.approx(better - score, abs=1e-12)
