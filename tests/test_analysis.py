"""The offline analysis on a results dataset with planted ground truth: best α, retention,
correlations (against scipy), bootstrap intervals, the figures' data, bad input, no torch."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import stats

from vlmerge.analysis import analyze, interactive
from vlmerge.analysis import plots
from vlmerge.analysis.load import load
from vlmerge.analysis.run import compute, distance_points, views
from vlmerge.analysis.scores import TaskMetric, task_scores
from vlmerge.analysis.tables import merges
from conftest import REPO
from vlmerge.config import AnalysisConfig
from vlmerge.errors import VlmergeError
from vlmerge.results import DISTANCES_SCHEMA, ITEMS_SCHEMA, RESULTS_SCHEMA, write_rows

WORDS = [1000, 2000, 4000, 8000, 16000, 32000]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
# BLiMP-like text task: two paradigms of 20 items, the score their macro mean (steps of 0.025).
# The merge at α = 0.5 loses DROP[i] against the text twin (0.8); the multimodal twin scores 0.6.
DROP = [0.025, 0.075, 0.05, 0.1, 0.075, 0.125]
TEXT_SCORE = {0.0: 0.6, 0.25: 0.65, 0.75: 0.8, 1.0: 0.8}
# Winoground-like multimodal task, 40 items: the twins 0.3 (text) and 0.5 (multimodal); at α = 0.5
# the drop is 0.025 except for the first pair (0.05), beyond the tolerance of 0.03.
MM_SCORE = {0.0: 0.5, 0.25: 0.5, 0.75: 0.4, 1.0: 0.3}
TOLERANCE = 0.03
PLANTED_BEST = [0.25, 0.5, 0.5, 0.5, 0.5, 0.5]
OPTIONS = AnalysisConfig(text_tasks={"blimp": "accuracy"}, multimodal_tasks={"winoground": "image_score"},
                         tolerance=TOLERANCE, alpha=0.5, bootstrap=200, seed=0)
PNG_ONLY = OPTIONS.model_copy(update={"figures": "png"})


def text_score(i: int, alpha: float) -> float:
    return 0.8 - DROP[i] if alpha == 0.5 else TEXT_SCORE[alpha]


def mm_score(i: int, alpha: float) -> float:
    return (0.45 if i == 0 else 0.475) if alpha == 0.5 else MM_SCORE[alpha]


def correct_items(k: int, n: int, shift: int) -> np.ndarray:
    """n items of which k are correct, the correct ones rotated by `shift`."""
    return np.roll(np.arange(n) < k, shift).astype(float)


def model_rows(model: dict, blimp: float, wino: float, shift: int) -> tuple[list[dict], list[dict]]:
    """Metric rows and item rows of one model with the given scores."""
    k = round(blimp * 40)  # correct pairs in all: the paradigms share them (macro mean = k / 40)
    p1, p2 = correct_items((k + 1) // 2, 20, shift), correct_items(k // 2, 20, 3 * shift)
    w = correct_items(round(wino * 40), 40, shift)
    base = {"item_id": "x", "code_version": "t", "config_hash": "", "slurm_job_id": "", "created_at": "t"}
    metrics = [{**model, **base, "task": "blimp", "subtask": s, "metric": "accuracy", "value": v.mean(), "n": 20}
               for s, v in (("p1", p1), ("p2", p2))]
    metrics += [{**model, **base, "task": "blimp", "subtask": "", "metric": "accuracy",
                 "value": (p1.mean() + p2.mean()) / 2, "n": 40},
                {**model, **base, "task": "winoground", "subtask": "", "metric": "image_score", "value": w.mean(), "n": 40},
                {**model, **base, "task": "winoground", "subtask": "", "metric": "text_score", "value": 0.1, "n": 40}]
    items = [{**model, "item_id": "x", "task": "blimp", "subtask": s, "example_id": f"{s}/{k}", "value": ok}
             for s, v in (("p1", p1), ("p2", p2)) for k, ok in enumerate(v)]
    items += [{**model, "item_id": "x", "task": "winoground", "subtask": "", "example_id": f"{k}/{name}", "value": ok}
              for name, v in (("image_score", w), ("text_score", 1 - w)) for k, ok in enumerate(v)]
    return metrics, items


def pair_model(i: int, alpha: float) -> dict:
    return {"experiment": "synth", "text_run": "text", "mm_run": "multimodal", "text_words": WORDS[i],
            "mm_words": WORDS[i], "method": "linear", "alpha": alpha, "method_params": "{}"}


def twin_model(i: int, run: str) -> dict:
    text = run == "text"
    return {"experiment": "synth", "text_run": "text" if text else None, "mm_run": None if text else "multimodal",
            "text_words": WORDS[i] if text else None, "mm_words": None if text else WORDS[i], "method": "none",
            "alpha": 1.0 if text else 0.0, "method_params": "{}"}


def tssd(i: int) -> float:
    return 2 * DROP[i] + 0.01 * np.sin(7 * i)


def write_results(root, pairs=range(len(WORDS)), alphas=ALPHAS) -> None:
    """results/synth/{metrics,items,distances} and runs/synth/<run>/metrics.jsonl under root."""
    out = root / "results" / "synth"
    for i in pairs:
        metrics, items = [], []
        for model, blimp, wino in [(twin_model(i, "text"), 0.8, 0.3), (twin_model(i, "mm"), 0.6, 0.5),
                                   *((pair_model(i, a), text_score(i, a), mm_score(i, a)) for a in alphas)]:
            m, it = model_rows(model, blimp, wino, shift=i)
            metrics += m
            items += it
        write_rows(metrics, RESULTS_SCHEMA, out / "metrics" / f"pair{i}.parquet")
        write_rows(items, ITEMS_SCHEMA, out / "items" / f"pair{i}.parquet")
        distances = [{"experiment": "synth", "text_run": "text", "mm_run": "multimodal", "text_words": WORDS[i],
                      "mm_words": WORDS[i], "space": "weights", "scope": scope, "metric": metric,
                      "value": tssd(i) * (2 if scope == "layer.0" else 1) if metric == "tssd" else 1 + np.cos(i + k)}
                     for scope in ("model", "layer.0") for k, metric in enumerate(("l2", "cosine", "ssd", "tssd"))]
        write_rows(distances, DISTANCES_SCHEMA, out / "distances" / f"pair{i}.parquet")
    for run, losses in (("text", [5.0, 3.0, 2.0]), ("multimodal", [5.5, 3.5, 2.5])):
        log = root / "runs" / "synth" / run / "metrics.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"step": k, "words": 100 * (k + 1), "loss": v}) + "\n"
                               for k, v in enumerate(losses)) + "not json\n")


@pytest.fixture
def synth(tmp_path):
    write_results(tmp_path)
    return tmp_path


def test_best_alpha_and_retention_are_the_planted_ones(synth):
    a = compute(load([synth / "results/synth"]), OPTIONS)
    best = a.best.sort_values("text_words")
    assert best.best_alpha.tolist() == PLANTED_BEST
    planted_score = [text_score(i, b) for i, b in enumerate(PLANTED_BEST)]
    assert np.allclose(best.score, planted_score)
    assert np.allclose(best.retention, [(s - 0.6) / (0.8 - 0.6) for s in planted_score])
    assert np.allclose(best.mm_drop, [0.0, 0.025, 0.025, 0.025, 0.025, 0.025])
    drops = a.scores[(a.scores.task == "blimp") & (a.scores.alpha == 0.5)].sort_values("text_words")["drop"]
    assert np.allclose(drops, DROP)


def test_correlations_equal_scipys_with_bootstrap_intervals(synth):
    a = compute(load([synth / "results/synth"]), OPTIONS)
    corr = a.correlations
    assert {"metric", "scope", "task", "alpha", "pearson", "spearman", "ci_low", "ci_high", "n"} <= set(corr.columns)
    assert len(corr) == 2 * 5 * 8  # tasks × α × (4 metrics × 2 scopes)
    for scope, factor in (("model", 1), ("layer.0", 2)):
        row = corr[(corr.task == "blimp") & (corr.alpha == 0.5) & (corr.metric == "tssd") & (corr.scope == scope)]
        x = [factor * tssd(i) for i in range(len(WORDS))]
        assert row.pearson.item() == pytest.approx(stats.pearsonr(x, DROP).statistic, abs=1e-12)
        assert row.spearman.item() == pytest.approx(stats.spearmanr(x, DROP).statistic, abs=1e-12)
        assert row.n.item() == len(WORDS)
        # 20 items per paradigm make each drop uncertain by about ±0.05: a wide interval
        assert -1 <= row.ci_low.item() < 0.6 < row.ci_high.item() <= 1
    l2 = corr[(corr.task == "winoground") & (corr.alpha == 0.75) & (corr.metric == "l2") & (corr.scope == "model")]
    # a constant drop (0.1 everywhere at α = 0.75) has no correlation: NaN, as scipy's
    assert np.isnan(l2.pearson.item())


def test_bootstrap_scores_resample_items_within_paradigms(synth):
    results = load([synth / "results/synth"])
    tm = TaskMetric("blimp", "accuracy", "text")
    scores = task_scores(results, tm, 4000, np.random.default_rng(1))
    twin = scores.loc[("synth", "none", "{}", "text", "", 1000, -1, 1.0)]
    assert twin[0] == pytest.approx(0.8)
    # macro mean of two paradigms of 20 items at p = 0.8: sd = sqrt(2 · p(1 - p) / 20) / 2
    assert twin[1:].mean() == pytest.approx(0.8, abs=0.005)
    assert twin[1:].std() == pytest.approx(np.sqrt(2 * 0.8 * 0.2 / 20) / 2, rel=0.06)


def test_lower_is_better_metrics_drop_when_they_rise(synth):
    scores = pd.DataFrame({0: [10.0, 12.0, 11.0, 15.0]}, index=pd.MultiIndex.from_tuples([
        ("e", "none", "{}", "text", "", 5, -1, 1.0), ("e", "none", "{}", "", "mm", -1, 5, 0.0),
        ("e", "linear", "{}", "text", "mm", 5, 5, 0.5), ("e", "linear", "{}", "text", "mm", 5, 5, 0.7)],
        names=["experiment", "method", "method_params", "text_run", "mm_run", "text_words", "mm_words", "alpha"]))
    m = merges(scores, TaskMetric("perplexity", "perplexity", "text"))
    assert m.drop[:, 0].tolist() == [1.0, 5.0]  # the better twin is the text one (10)
    assert m.retention[:, 0].tolist() == [0.5, -1.5]


def test_figures_hold_the_expected_series(synth):
    a = compute(load([synth / "results/synth"]), OPTIONS)
    blimp = a.scores[a.scores.task == "blimp"]
    ax = plots.score_vs_words(blimp, "t").axes[0]
    assert [line.get_label() for line in ax.lines] == [f"α = {x:g}" for x in ALPHAS]
    half = ax.lines[ALPHAS.index(0.5)]
    assert half.get_xdata().tolist() == WORDS
    assert np.allclose(half.get_ydata(), [0.8 - d for d in DROP])
    assert ax.get_xlabel() and ax.get_ylabel() == "blimp accuracy"

    ax = plots.heatmap(blimp, "t").axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (len(WORDS), len(ALPHAS))
    assert np.allclose(grid[:, ALPHAS.index(1.0)], 0.8) and np.allclose(grid[:, ALPHAS.index(0.5)], 0.8 - np.array(DROP))

    points = distance_points(blimp, a.results.distances, 0.5)
    fig = plots.distance_vs_drop(points, "t", "drop")
    panel = fig.axes[sorted(points.metric.unique()).index("tssd")]
    xy = panel.collections[0].get_offsets()
    assert np.allclose(xy[:, 0], [tssd(i) for i in range(len(WORDS))]) and np.allclose(xy[:, 1], DROP)
    fit = panel.lines[0]
    slope = np.diff(fit.get_ydata()) / np.diff(fit.get_xdata())
    assert slope[0] == pytest.approx(np.polyfit([tssd(i) for i in range(len(WORDS))], DROP, 1)[0])
    assert panel.get_xlabel() == "tssd distance" and panel.get_ylabel() == "drop"

    ax = plots.training_curves(a.results.training).axes[0]
    assert {line.get_label(): line.get_ydata().tolist() for line in ax.lines} == \
        {"multimodal": [5.5, 3.5, 2.5], "text": [5.0, 3.0, 2.0]}


def test_analyze_writes_tables_figures_and_one_self_contained_report(synth):
    out = synth / "report"
    report = analyze([synth / "results/synth"], out, PNG_ONLY)
    html = report.read_text()
    figures = sorted((out / "figures").glob("*.png"))
    # (curve, heatmap, distance fit) per task + training + Takmaz et al.'s Fig. 3 and 10 (no α = 0.3: no Fig. 11)
    assert len(figures) == 2 * 3 + 1 + 2
    assert html.count('<img src="data:image/png;base64,') == len(figures) and "src=\"figures/" not in html
    assert "<script" not in html  # analysis.figures: png draws no interactive view
    # each embedded figure decodes to the PNG written beside it, a real plot: lines and heatmaps
    # bring far more colours than text alone
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert sorted(embedded) == sorted(f.read_bytes() for f in figures)
    for png in embedded:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert pixels.shape[0] > 200 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    best = pd.read_csv(out / "best_alpha.csv").sort_values("text_words")
    assert best.best_alpha.tolist() == PLANTED_BEST
    assert (out / "correlations.csv").is_file() and (out / "scores.csv").is_file()
    summary = (out / "summary.md").read_text()
    assert "| synth: linear | 1000 | 1000 | blimp | accuracy | 0.25 |" in summary
    assert "1 malformed line(s)" in summary  # the runs' logs end with a bad line


def test_bad_input_becomes_notes_not_a_crash(tmp_path):
    write_results(tmp_path, pairs=[0, 1], alphas=[0.5])
    metrics = tmp_path / "results/synth/metrics"
    pq.write_table(RESULTS_SCHEMA.empty_table(), metrics / "empty.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(metrics / "foreign.parquet")
    (metrics / "broken.parquet").write_bytes(b"not parquet")
    log = tmp_path / "runs/synth/text/metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 3, "words": 400, "loss": 1.5, "note": "caf\xe9"}\n')  # Latin-1
    out = tmp_path / "report"
    notes = (analyze([tmp_path / "results/synth"], out, OPTIONS).parent / "summary.md").read_text()
    assert f"{log}: 2 malformed line(s) left out" in notes  # the log's last lines: not JSON, not UTF-8
    assert "empty.parquet: empty; left out" in notes
    assert "foreign.parquet: not a metrics file (missing columns: experiment" in notes
    assert "broken.parquet: not a readable Parquet file" in notes
    assert "a single α (0.5)" in notes
    assert "correlations of blimp (linear): 2 checkpoint pair(s), fewer than 3; left empty" in notes
    corr = pd.read_csv(out / "correlations.csv")
    assert len(corr) and corr.pearson.isna().all()


def test_a_folder_without_results_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics").mkdir()
    with pytest.raises(VlmergeError, match="no Parquet files"):
        load([tmp_path])
    r = subprocess.run([sys.executable, "-m", "vlmerge.analysis", "--results", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "nowhere: not a folder" in r.stderr and not (tmp_path / "out").exists()


def test_python_m_analysis_never_imports_torch(synth):
    code = ("import sys; from vlmerge.cli import main; "
            f"rc = main(['analyze', '--results', {str(synth / 'results/synth')!r}, '--out', {str(synth / 'r')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"analyze: report {synth / 'r' / 'report.html'}"


@pytest.mark.browser
def test_the_report_renders_in_headless_chromium(synth, tmp_path):
    report = analyze([synth / "results/synth"], synth / "report", PNG_ONLY)
    shot = tmp_path / "shot.png"
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,8000", f"--screenshot={shot}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    # End to end: the browser decoded the embedded PNGs (text and tables alone: ~600 colours) and
    # laid the page out past the tables (the figures' content is checked without a browser above).
    page = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(page.reshape(-1, 3), axis=0)) > 5000
    inked_rows = np.flatnonzero((page < 200).any(axis=(1, 2)))
    assert inked_rows.max() > 5000


# --- the interactive report: one view per figure kind, drawn by the vendored plotly.js ---------------------------


def figure(view: interactive.View, *keys: str) -> dict:
    (found,) = [fig for k, fig in view.figures if k == keys]
    return found


def test_interactive_views_show_the_analysis_numbers(synth):
    a = compute(load([synth / "results/synth"]), OPTIONS)
    shown = views(a, [])
    assert list(shown) == ["Score by checkpoint and α", "Score by words seen", "Distance against drop", "Training"]
    # one experiment, one merge setting, one space: no selector for them
    heat, lines, fits = (shown[k] for k in ("Score by checkpoint and α", "Score by words seen", "Distance against drop"))
    assert heat.selectors == lines.selectors == ["task", "metric"] and fits.selectors == ["task", "α", "distance"]
    assert {k for k, _ in heat.figures} == {(t, q) for t in ("blimp", "winoground") for q in ("score", "drop", "retention")}

    (cells,) = figure(heat, "blimp", "score")["data"]
    assert cells["x"] == ["0", "0.25", "0.5", "0.75", "1"] and cells["y"] == [f"{w:,}" for w in WORDS]
    z = np.array(cells["z"])
    assert np.allclose(z[:, ALPHAS.index(0.5)], [0.8 - d for d in DROP]) and np.allclose(z[:, ALPHAS.index(1.0)], 0.8)
    assert np.allclose(np.array(figure(heat, "blimp", "drop")["data"][0]["z"])[:, ALPHAS.index(0.5)], DROP)

    score = {t["name"]: t for t in figure(lines, "winoground", "score")["data"]}
    assert list(score) == [*(f"α = {x:g}" for x in ALPHAS), "chance (0.25)"]
    assert score["α = 0.5"]["x"] == WORDS and np.allclose(score["α = 0.5"]["y"], [mm_score(i, 0.5) for i in range(6)])
    assert score["chance (0.25)"]["y"] == [0.25, 0.25]
    assert figure(lines, "winoground", "score")["layout"]["xaxis"]["type"] == "log"  # 1,000 to 32,000 words
    assert not any(t["name"].startswith("chance") for t in figure(lines, "winoground", "drop")["data"])

    points, fit = figure(fits, "blimp", "0.5", "tssd")["data"]
    x = [tssd(i) for i in range(len(WORDS))]
    assert np.allclose(points["x"], x, rtol=1e-4) and np.allclose(points["y"], DROP)
    assert np.diff(fit["y"]) / np.diff(fit["x"]) == pytest.approx(np.polyfit(x, DROP, 1)[0], rel=1e-3)
    r = a.correlations[(a.correlations.task == "blimp") & (a.correlations.alpha == 0.5) &
                       (a.correlations.metric == "tssd") & (a.correlations.scope == "model")].pearson.item()
    assert f"r = {r:.3f} [" in figure(fits, "blimp", "0.5", "tssd")["layout"]["title"]["text"]
    assert fits.initial[:2] == ("blimp", "0.5")  # first shown at the report's α, as the PNGs

    training = {t["name"]: t["y"] for t in shown["Training"].figures[0][1]["data"]}
    assert training == {"multimodal": [5.5, 3.5, 2.5], "text": [5.0, 3.0, 2.0]}


def test_a_views_figures_are_what_they_share_and_their_own_parts(synth):
    for view in views(compute(load([synth / "results/synth"]), OPTIONS), []).values():
        shared, own = interactive.factored([fig for _, fig in view.figures])
        for (_, fig), mine in zip(view.figures, own):
            assert {**shared["layout"], **mine["layout"]} == fig["layout"]
            assert [{**shared["traces"][i], **trace} for i, trace in enumerate(mine["data"])] == fig["data"]
        assert shared["layout"]["height"] and shared["traces"][0]["type"]


@pytest.mark.parametrize("figures", ["both", "interactive"])
def test_analysis_figures_gives_the_interactive_views_and_the_pngs_for_papers(synth, figures):
    out = synth / f"report-{figures}"
    html = analyze([synth / "results/synth"], out, OPTIONS.model_copy(update={"figures": figures})).read_text()
    # one view per figure kind: heatmap, score by words, distance, training and the paper's views (Fig. 3 and 10)
    assert re.findall(r"<div class='view' id='view-([a-z0-9_]+)'>", html) == \
        ["heatmap", "score_vs_words", "distance_vs_drop", "training", "takmaz2025"]
    assert interactive.PLOTLY.read_text(encoding="utf-8") in html  # inlined: nothing to fetch
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=", html) and "data:image/png" not in html
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(pngs) == (2 * 3 + 1 + 2 if figures == "both" else 0)
    assert ("9 in figures/" in html) == (figures == "both")
    assert len(html) < len(interactive.PLOTLY.read_bytes()) + 300_000


def test_the_vendored_plotly_is_the_pinned_release():
    data = interactive.PLOTLY.read_bytes()
    assert hashlib.sha256(data).hexdigest() == interactive.PLOTLY_SHA256
    readme = (interactive.PLOTLY.parent / "README.md").read_text()
    assert f"| {interactive.PLOTLY_VERSION} | `{interactive.PLOTLY_SHA256}` |" in readme
    assert f"plotly.js (cartesian - minified) v{interactive.PLOTLY_VERSION}" in data[:200].decode()
    assert b"</script" not in data.lower()  # the report inlines it in a <script> element
    assert (interactive.PLOTLY.parent / "LICENSE-plotly.js").read_text().startswith("MIT License")


@pytest.mark.browser
def test_choosing_a_task_redraws_the_interactive_figure_in_headless_chromium(synth, tmp_path):
    from chromium import Chromium

    report = analyze([synth / "results/synth"], synth / "report", OPTIONS.model_copy(update={"figures": "interactive"}))
    scores = pd.read_csv(synth / "report/scores.csv")
    heat = "#view-heatmap"
    state = (f"(() => {{ const plot = document.querySelector('{heat} .plot'); return {{task: "
             f"document.querySelector('{heat} select').value, title: plot.querySelector('.gtitle').textContent, "
             "z: plot.data[0].z}; })()")
    with Chromium(tmp_path / "profile") as browser:
        browser.open(report.as_uri())
        assert browser.wait_for("[...document.querySelectorAll('.view .plot')].every(p => p.querySelector('.main-svg'))"
                                " && document.querySelectorAll('.view').length") == 5  # every view drawn
        assert browser.evaluate("document.querySelector('#view-distance_vs_drop select[data-selector=\"1\"]').value") \
            == "0.5"  # the distance view opens at the report's α
        before, shot = browser.evaluate(state), browser.screenshot(f"{heat} .plot")
        browser.press(f"{heat} select[data-selector='0']", "ArrowDown", 40)  # the task selector: the next task
        after = browser.wait_for(f"document.querySelector('{heat} .gtitle').textContent !== {json.dumps(before['title'])}"
                                 f" && {state}")
        shot_after = browser.screenshot(f"{heat} .plot")
    assert (before["task"], after["task"]) == ("blimp", "winoground")
    assert before["title"].startswith("blimp") and after["title"].startswith("winoground")
    for seen in (before, after):
        planted = scores[scores.task == seen["task"]].pivot_table(index="text_words", columns="alpha", values="score")
        assert np.allclose(np.array(seen["z"], dtype=float), planted.to_numpy(), atol=1e-4)
    pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int) for png in (shot, shot_after)]
    assert pixels[0].shape == pixels[1].shape and (pixels[0] != pixels[1]).any(axis=2).mean() > 0.05  # redrawn
    assert browser.requests and all(url.startswith(("file:", "data:")) for url in browser.requests)  # no network


def test_a_subtask_key_scores_that_subtask_alone():
    from vlmerge.analysis.scores import metric_items, reported, task_metrics

    model = pair_model(0, 0.5)
    metrics = pd.DataFrame([{**model, "task": "winoground", "subtask": sub, "metric": "unpaired_accuracy", "value": v}
                            for sub, v in (("", 0.6), ("tag:attribute", 0.8), ("tag:binding", 0.5))])
    items = pd.DataFrame([{**model, "task": "winoground", "subtask": sub, "example_id": f"{sub}{k}/unpaired_accuracy/i",
                           "value": v} for sub, v in (("tag:attribute", 1.0), ("tag:binding", 0.0)) for k in range(3)])
    notes: list[str] = []
    (tm,) = task_metrics(metrics, {}, {"winoground/tag:attribute": "unpaired_accuracy"}, notes)
    assert (tm.task, tm.source, tm.chance) == ("winoground/tag:attribute", ("winoground", "tag:attribute"), 0.5)
    assert reported(metrics, tm).tolist() == [0.8]
    assert set(metric_items(items, tm).subtask) == {"tag:attribute"}
    missing = task_metrics(metrics, {}, {"winoground/tag:object": "unpaired_accuracy"}, notes)
    assert missing == [] and notes == ["task winoground/tag:object: no 'unpaired_accuracy' rows (it has none); left out"]


def paper_scores() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best-text pairing: every multimodal checkpoint with the text checkpoint at 2,000 words (the best
    on the best-text data), plus an equal-words pair that the paper's views must leave out."""
    rows = []
    for mm_words, mm_twin in ((1000, 0.60), (2000, 0.62), (4000, 0.64)):
        for alpha in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
            for task, metric, base in (("blimp", "accuracy", 0.7), ("winoground", "unpaired_accuracy", 0.4),
                                       ("winoground_full", "unpaired_accuracy", 0.5)):
                rows.append({"experiment": "paper", "method": "linear", "method_params": "{}", "text_run": "text",
                             "mm_run": "multimodal", "text_words": 2000, "mm_words": mm_words, "alpha": alpha,
                             "task": task, "metric": metric, "score": base + alpha / 10 + mm_words / 1e5,
                             "text_twin": 0.75, "mm_twin": mm_twin if task == "blimp" else base})
    rows.append({**rows[0], "text_words": 1000, "alpha": 0.3, "score": 0.0})  # not the best text checkpoint
    best_text = pd.DataFrame([{"experiment": "paper", "run": run, "words": w, "task": "blimp", "data": "/full/blimp",
                               "accuracy": acc} for run, w, acc in (("text", 1000, 0.70), ("text", 2000, 0.76),
                                                                    ("text", 4000, 0.74), ("multimodal", 1000, 0.61),
                                                                    ("multimodal", 2000, 0.66), ("multimodal", 4000, 0.65))])
    return pd.DataFrame(rows), best_text


def test_takmaz_views_hold_the_papers_series_and_numbers():
    from vlmerge.analysis import paper
    from vlmerge.analysis.load import Results

    scores, best_text = paper_scores()
    empty = pd.DataFrame()
    results = Results(empty, empty, empty, empty, [], best_text)
    views = {v.name: v for v in paper.views(results, scores, "paper")}
    assert list(views) == ["Fig. 3", "Fig. 10", "Fig. 11"]
    fig3 = views["Fig. 3"].table
    assert fig3.to_dict("list") == {"words seen": [1000, 2000, 4000], "multimodal twin": [0.61, 0.66, 0.65],
                                    "text twin": [0.70, 0.76, 0.74]}
    assert "/full/blimp" in views["Fig. 3"].caption
    # Fig. 10: the paper's α only, with the best text checkpoint (2,000 words), beside the multimodal twin
    fig10 = views["Fig. 10"].table
    assert list(fig10.columns) == ["words seen", "α = 0.3", "α = 0.5", "α = 0.8", "multimodal twin"]
    assert fig10["words seen"].tolist() == [1000, 2000, 4000]
    assert fig10["α = 0.3"].tolist() == pytest.approx([0.74, 0.75, 0.77])
    assert fig10["multimodal twin"].tolist() == [0.60, 0.62, 0.64]
    # Fig. 11: the full Winoground (not BabyLM's filtered one), α = 0.3, chance 0.5 drawn
    fig11 = views["Fig. 11"]
    assert "winoground_full" in fig11.caption and list(fig11.table.columns) == ["words seen", "α = 0.3", "multimodal twin"]
    assert fig11.table["α = 0.3"].tolist() == pytest.approx([0.54, 0.55, 0.57])
    ax = fig11.figure.axes[0]
    assert [line.get_label() for line in ax.lines] == ["α = 0.3", "multimodal twin", "chance (0.5)"]
    assert ax.lines[1].get_linestyle() == "--" and list(ax.lines[2].get_ydata()) == [0.5, 0.5]
    ref = paper.reference(list(views.values()), scores, "paper").set_index("")
    assert ref.loc["full BLiMP, best text-only checkpoint"].tolist() == ["74.82 (at 100M words)", "76.00 (at 2,000 words)"]
    assert ref.loc["full BLiMP, best multimodal checkpoint", "this run (paper)"] == "66.00 (at 2,000 words)"
    assert ref.loc["Winoground, multimodal twin and α = 0.3 merge (Fig. 11)", "this run (paper)"] == "50.00–57.00"
    assert ref.loc["blimp: the paired text twin vs the last multimodal checkpoint", "this run (paper)"].startswith(
        "text-only ahead (0.75 vs 0.64")


# --- fine-tuning rows (task glue/<name>): their table and findings, apart from the sweep's --------------------


def finetune_rows(model: dict, correct: np.ndarray) -> tuple[list[dict], list[dict]]:
    base = {"item_id": "ft", "code_version": "t", "config_hash": "", "slurm_job_id": "", "created_at": "t"}
    metrics = [{**model, **base, "task": "glue/cola", "subtask": "", "metric": m, "value": v, "n": len(correct)}
               for m, v in (("accuracy", correct.mean()), ("f1", 0.5), ("mcc", 0.1))]
    items = [{**model, "item_id": "ft", "task": "glue/cola", "subtask": "", "example_id": f"cola_{k}", "value": ok}
             for k, ok in enumerate(correct)]
    return metrics, items


def test_finetune_rows_get_their_table_and_paired_findings_and_leave_the_sweep_analysis_alone(synth, tmp_path):
    i, n = len(WORDS) - 1, 200
    text = correct_items(160, n, 0)  # 0.8
    models = [(twin_model(i, "text"), text), (twin_model(i, "mm"), correct_items(100, n, 7)),  # 0.5: below
              (pair_model(i, 0.5), text.copy())]  # the text twin's own answers: no difference at all
    metrics, items = [], []
    for model, correct in models:
        m, it = finetune_rows(model, correct)
        metrics += m
        items += it
    out = synth / "results" / "synth"
    write_rows(metrics, RESULTS_SCHEMA, out / "metrics" / "ft.parquet")
    write_rows(items, ITEMS_SCHEMA, out / "items" / "ft.parquet")
    without = compute(load([synth / "results/synth"]), OPTIONS)

    analyze([synth / "results/synth"], tmp_path / "report", OPTIONS)
    table = pd.read_csv(tmp_path / "report" / "finetune.csv")
    assert table.model.tolist() == ["multimodal twin", "text twin", "linear α=0.5"]
    assert np.allclose(table.accuracy, [0.5, 0.8, 0.8]) and (table.n == n).all()
    assert ((table.accuracy_low < table.accuracy) & (table.accuracy < table.accuracy_high)).all()
    findings = json.loads((tmp_path / "report" / "findings.json").read_text())
    tuned = {f["details"]["model"]: f for f in findings if f["kind"] == "finetune"}
    assert tuned["multimodal twin"]["effect"] and tuned["multimodal twin"]["value"] == pytest.approx(-0.3)
    assert "below the text twin in accuracy after fine-tuning on cola at 32,000 words by 0.300" in \
        tuned["multimodal twin"]["text"]
    # paired: the merge answers as the text twin does item by item, so every resample gives 0
    assert not tuned["linear α=0.5"]["effect"] and tuned["linear α=0.5"]["high"] == tuned["linear α=0.5"]["low"] == 0
    # the sweep's own analysis is as it was without the fine-tuning rows
    report_scores = pd.read_csv(tmp_path / "report" / "scores.csv")
    assert set(report_scores.task) == set(without.scores.task) and "glue/cola" not in set(report_scores.task)
    assert not any("glue/cola" in note for note in (tmp_path / "report" / "summary.md").read_text().splitlines()
                   if note.startswith("- task"))
