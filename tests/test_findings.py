"""Findings on planted ground truth: the numbers each sentence states, checked against an
independent computation, and the "no effect" sentences where the planted data has no effect."""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from test_analysis import DROP, OPTIONS, WORDS, mm_score, text_score, tssd, write_results
from vlmerge.analysis import analyze
from vlmerge.analysis.findings import Finding, by_task, headlines, twin_gap, with_headlines
from vlmerge.analysis.load import load
from vlmerge.analysis.plots import score_vs_words
from vlmerge.analysis.run import compute
from vlmerge.analysis.scores import TaskMetric
from vlmerge.analysis.tables import Merges

LAST = len(WORDS) - 1


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_results(root)
    return compute(load([root / "results/synth"]), OPTIONS)


def by_kind(a, kind: str, task: str) -> list:
    return [f for f in a.findings if f.kind == kind and f.task == task]


def test_twin_gap_is_the_planted_difference_with_an_interval(analysis):
    (blimp,) = by_kind(analysis, "twin_gap", "blimp")
    assert blimp.value == pytest.approx(0.8 - 0.6)
    assert blimp.low < 0.2 < blimp.high and blimp.low > 0 and blimp.effect
    assert blimp.text.startswith(f"At {WORDS[LAST]:,} words the text twin is ahead on blimp accuracy by 0.200 [")
    (wino,) = by_kind(analysis, "twin_gap", "winoground")
    assert wino.value == pytest.approx(0.3 - 0.5) and wino.effect
    assert "the multimodal twin is ahead on winoground image_score by 0.200" in wino.text


def test_chance_findings_say_when_a_score_is_no_better_than_guessing(analysis):
    found = {f.details["twin"]: f for f in by_kind(analysis, "chance", "winoground")}
    assert found["multimodal"].value == pytest.approx(0.5) and found["multimodal"].effect
    assert found["multimodal"].null == 0.25 and "above chance (0.25) by 0.250" in found["multimodal"].text
    # The blind twin's 0.3 on 40 items: its interval contains the chance level 0.25.
    assert found["text"].value == pytest.approx(0.3) and not found["text"].effect
    assert found["text"].low <= 0.25 <= found["text"].high
    assert "contains chance (0.25): no better than guessing" in found["text"].text


def test_merge_finding_states_the_best_alphas_retention_and_multimodal_loss(analysis):
    (merge,) = by_kind(analysis, "merge", "blimp")
    # Planted: at the last pair α = 0.5 is the best within tolerance; blimp 0.8 - DROP[-1], twins 0.8 / 0.6.
    kept = (text_score(LAST, 0.5) - 0.6) / (0.8 - 0.6)
    assert merge.details["alpha"] == 0.5 and merge.value == pytest.approx(kept)
    assert merge.details["drops"]["winoground"][0] == pytest.approx(0.5 - mm_score(LAST, 0.5))
    assert f"linear at α = 0.5 keeps {100 * kept:.0f}% [" in merge.text
    assert "loses 0.025 [" in merge.text


def test_merge_finding_says_so_when_only_the_multimodal_twin_keeps_the_image_abilities(tmp_path):
    # Planted: only α = 0 (the multimodal twin's weights) keeps the multimodal drop within the tolerance.
    write_results(tmp_path, alphas=[0.0, 0.75, 1.0])
    (merge,) = by_kind(compute(load([tmp_path / "results/synth"]), OPTIONS), "merge", "blimp")
    assert merge.details["alpha"] == 0.0 and merge.value == 0.0 and not merge.effect
    assert merge.text == (f"At {WORDS[LAST]:,} words only α = 0 of linear, no weight on the text twin, keeps every "
                          "multimodal drop within the tolerance: no merge keeps any of the text twin's advantage on "
                          "blimp accuracy without losing image abilities.")


def test_alpha_trend_is_spearmans_rho_over_the_planted_scores(analysis):
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    for task, score, word in (("blimp", text_score, "rises"), ("winoground", mm_score, "falls")):
        (trend,) = by_kind(analysis, "alpha_trend", task)
        expected = stats.spearmanr(alphas, [score(LAST, a) for a in alphas]).statistic
        assert trend.value == pytest.approx(expected) and trend.effect
        assert f"{word} with α (Spearman ρ = {expected:.3f}" in trend.text


def test_distance_finding_names_the_planted_predictor(analysis):
    (found,) = by_kind(analysis, "distance", "blimp")
    expected = stats.pearsonr([tssd(i) for i in range(len(WORDS))], DROP).statistic
    assert found.details["metric"] == "tssd" and found.value == pytest.approx(expected)
    assert found.n == len(WORDS) and "TSSD (weights) predicts the drop in blimp accuracy best" in found.text


def test_equal_twins_get_the_no_effect_sentence():
    rng = np.random.default_rng(0)
    replicates = 0.7 + 0.02 * rng.standard_normal((1, 501))
    keys = pd.DataFrame([{"experiment": "e", "method": "linear", "method_params": "{}", "text_run": "text",
                          "mm_run": "multimodal", "text_words": 100, "mm_words": 100, "alpha": 0.5}])
    same = Merges(TaskMetric("blimp", "accuracy", "text"), keys, replicates, replicates[:, ::-1].copy(), replicates)
    (found,) = twin_gap(same)
    assert found.value == pytest.approx(replicates[0, -1] - replicates[0, 0]) and not found.effect
    assert found.text.startswith("At 100 words the twins do not differ on blimp accuracy: text − multimodal = ")
    assert found.text.endswith("an interval that contains 0.")
    (bare,) = twin_gap(Merges(same.task, keys, replicates[:, :1], replicates[:, :1] + 0.1, replicates[:, :1]))
    assert bare.value == pytest.approx(0.1) and not bare.effect  # no replicates: no claim
    assert bare.text.endswith("(no interval), no interval (no per-item scores) to tell.")


def test_report_opens_with_the_headline_findings_and_collapses_the_others_by_task(tmp_path):
    write_results(tmp_path)
    report = analyze([tmp_path / "results/synth"], tmp_path / "report", OPTIONS).read_text()
    start = report.index("<h2>Findings</h2>")
    assert report.index("<h2>") == start  # the first section
    part = report[start:report.index("<h2>", start + 1)]
    rows = json.loads((tmp_path / "report/findings.json").read_text())
    assert {r["kind"] for r in rows} == {"twin_gap", "chance", "merge", "alpha_trend", "distance"}
    top = sorted((r for r in rows if r["headline"]), key=lambda r: r["headline"])
    assert [r["headline"] for r in top] == [1, 2, 3, 4]
    # the headline: the first list, in its order; no other list before the groups
    first_list = part[part.index("<ul>"):part.index("</ul>")]
    assert re.findall(r"<li>(.*?)</li>", first_list) == [html.escape(r["text"]) for r in top]
    assert part.index("</ul>") < part.index("<details>")
    assert "the text twin is ahead on blimp accuracy by 0.200" in first_list
    # every other finding once, in its task's group, each group collapsed (no `open`)
    groups = re.findall(r"<details><summary>([^<]*) \((\d+)\)</summary>(.*?)</details>", part)
    rest = [r for r in rows if not r["headline"]]
    assert [(task, int(n)) for task, n, _ in groups] == [(t, sum(r["task"] == t for r in rest)) for t in ("blimp", "winoground")]
    assert sorted(t for *_, body in groups for t in re.findall(r"<li>(.*?)</li>", body)) == \
        sorted(html.escape(r["text"]) for r in rest)
    assert "<details open" not in report
    findings_md = (tmp_path / "report/findings.md").read_text()
    assert findings_md.count("\n- ") == len(rows) and findings_md.index("## Headline") < findings_md.index("## blimp")
    summary = (tmp_path / "report/summary.md").read_text()
    assert summary.count("\n- At ") == len(top) and f"All {len(rows)} findings, by task: findings.md." in summary


def finding(kind: str, task: str, value: float, effect: bool = True) -> Finding:
    return Finding(kind, task, f"{kind} on {task}", value, value - 0.1, value + 0.1, 0.0, None, effect)


def test_headlines_are_the_largest_gaps_the_best_merge_and_the_best_predictor():
    items = [finding("twin_gap", "blimp", 0.1), finding("twin_gap", "ewok", 0.3, effect=False),  # larger, no effect
             finding("twin_gap", "comps", 0.2), finding("twin_gap", "vqa", -0.4), finding("twin_gap", "winoground", -0.1),
             finding("chance", "vqa", 0.9), finding("merge", "blimp", math.nan, effect=False),
             finding("merge", "blimp", 0.3), finding("merge", "blimp", 0.6, effect=False),
             finding("distance", "blimp", 0.95, effect=False), finding("distance", "vqa", 0.7),
             finding("distance", "winoground", 0.8), finding("alpha_trend", "blimp", 0.99)]
    assert [(f.kind, f.task, f.value) for f in headlines(items)] == [
        ("twin_gap", "comps", 0.2), ("twin_gap", "vqa", -0.4), ("merge", "blimp", 0.6), ("distance", "winoground", 0.8)]
    marked = with_headlines(items)
    assert [f.text for f in marked] == [f.text for f in items]  # the order stays: findings.json keeps them all
    assert [(f.task, f.headline) for f in marked if f.headline] == [("comps", 1), ("vqa", 2), ("blimp", 3),
                                                                     ("winoground", 4)]
    # the others by task, the tasks in the order of their first finding (comps has none left)
    assert [(task, len(group)) for task, group in by_task(marked)] == [("blimp", 5), ("ewok", 1), ("vqa", 2),
                                                                       ("winoground", 1)]
    # no setting with an α within the tolerance, no effect anywhere: the first merge and the highest r say so
    bare = [finding("twin_gap", "blimp", 0.1, effect=False), finding("merge", "blimp", math.nan, effect=False),
            finding("merge", "ewok", math.nan, effect=False), finding("distance", "vqa", 0.2, effect=False),
            finding("distance", "blimp", 0.4, effect=False)]
    assert [(f.kind, f.task) for f in headlines(bare)] == [("merge", "blimp"), ("distance", "blimp")]
    assert headlines([]) == []


def test_multimodal_score_figure_has_its_chance_line(analysis):
    rows = analysis.scores[analysis.scores.task == "winoground"]
    fig = score_vs_words(rows, "t", chance=0.25)
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("chance")]
    assert set(line.get_ydata()) == {0.25}


def settings_merges(offset: float) -> Merges:
    """Two settings at one checkpoint pair, three α each; ties' score is linear's plus `offset`, with noise."""
    rng = np.random.default_rng(1)
    rows, scores = [], []
    for method, shift in (("linear", 0.0), ("ties", offset)):
        for alpha in (0.0, 0.5, 1.0):
            rows.append({"experiment": "e", "method": method, "method_params": "{}", "text_run": "text",
                         "mm_run": "multimodal", "text_words": 100, "mm_words": 100, "alpha": alpha})
            scores.append(0.6 + 0.1 * alpha + shift + 0.03 * rng.standard_normal(401))
    score = np.array(scores)
    return Merges(TaskMetric("vqa", "accuracy", "multimodal"), pd.DataFrame(rows), score, score, score)


def test_best_method_is_the_higher_mean_over_alpha_and_says_when_it_is_no_winner():
    from vlmerge.analysis.findings import best_method

    clear = settings_merges(0.1)
    (found,) = best_method(clear)
    margin = clear.score[3:, 0].mean() - clear.score[:3, 0].mean()  # ties minus linear, reported values
    assert found.details["best"] == ["ties", "{}"] and found.value == pytest.approx(margin) and found.effect
    assert found.text.endswith(f"by {margin:.3f} [{found.low:.3f}, {found.high:.3f}].")
    (tie,) = best_method(settings_merges(0.0))
    assert not tie.effect and tie.text.endswith("an interval that contains 0: no clear winner.")


def test_a_merge_setting_with_an_alpha_schedule_is_named_in_words():
    from vlmerge.analysis.findings import setting_name

    assert setting_name("linear", '{"schedule": [{"filter": "multi_modal_projector", "value": 0}]}') == \
        "linear (multi_modal_projector at 0, the rest at α)"
    assert setting_name("ties", '{"density": 0.2, "schedule": [0, 1]}') == \
        'ties {"density": 0.2} (every tensor 0→1 over the layers)'
    assert setting_name("linear", '{"schedule": [{"filter": "self_attn", "value": [0, "alpha", 1]}, {"value": 0.5}]}') \
        == "linear (self_attn 0→α→1 over the layers, every tensor at 0.5)"
    assert setting_name("task_arithmetic", '{"lam": 2.0}') == 'task_arithmetic {"lam": 2.0}'
