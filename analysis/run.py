"""`vlmerge analyze`: results → tables (CSV, Markdown), correlations, figures, report.html, summary.md.

`analysis.figures` chooses the figures: PNGs embedded in the report (png), the report's interactive
views (interactive), or both (the views, and the PNGs under figures/ for papers); docs/report.md."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlmerge.analysis import interactive, paper, plots, sung
from vlmerge.analysis.finetune import finetune_findings, finetune_table, without_finetune
from vlmerge.analysis.findings import (Finding, by_task, ci, f3, findings, headline_of, setting_name, to_json,
                                       to_markdown, with_headlines)
from vlmerge.analysis.correlations import COLUMNS as CORRELATION_COLUMNS
from vlmerge.analysis.correlations import correlations, too_few_points
from vlmerge.analysis.load import CHECKPOINT_PAIR, Results, load, twin_results
from vlmerge.analysis.probe import probe_findings, probe_tables, rank_agreement
from vlmerge.analysis.report import Section, html_report, markdown_summary, markdown_table
from vlmerge.analysis.scores import chance, task_metrics, task_scores
from vlmerge.analysis.stats import line_fit
from vlmerge.analysis.tables import BEST_COLUMNS, SCORE_COLUMNS, Merges, best_alpha, merges, multimodal_drop
from vlmerge.config import AnalysisConfig
from vlmerge.results import UNMERGED
from vlmerge.io import remove_stale_temps, write_text

SETTING = ["experiment", "method", "method_params"]  # one merge setting of one experiment


@dataclasses.dataclass
class Analysis:
    """Everything computed from the results, before it is drawn or written."""

    results: Results
    merges: list[Merges]
    scores: pd.DataFrame  # Merges.table() of every task
    best: pd.DataFrame
    correlations: pd.DataFrame
    alpha: float  # the α of the distance figures (the one nearest analysis.alpha)
    findings: list[Finding]

    @property
    def notes(self) -> list[str]:
        return self.results.notes


def compute(results: Results, options: AnalysisConfig) -> Analysis:
    """Scores with bootstrap replicates, drops, retention, best α and correlations."""
    rng = np.random.default_rng(options.seed)
    results = without_alphaless(results)
    notes = results.notes
    tasks = task_metrics(results.metrics, options.text_tasks, options.multimodal_tasks, notes)
    all_merges = [merges(task_scores(results, tm, options.bootstrap, rng), tm) for tm in tasks]
    all_merges = [m for m in all_merges if len(m.keys)]
    scores = concat([m.table() for m in all_merges], SCORE_COLUMNS)
    mm_drop = multimodal_drop(all_merges)
    best = concat([best_alpha(m, mm_drop, options.tolerance) for m in all_merges if m.task.kind == "text"],
                  BEST_COLUMNS)
    corr = concat([correlations(m, results.distances) for m in all_merges], CORRELATION_COLUMNS)
    if not all_merges:
        notes.append("no merged models in the results: nothing to compare")
    elif mm_drop.empty:
        notes.append("no multimodal task in the results: the best α ignores grounding")
    if best.best_alpha.isna().any():
        notes.append(f"{int(best.best_alpha.isna().sum())} checkpoint pair(s) have no α within the multimodal "
                     f"tolerance {options.tolerance:g}")
    if all_merges and results.distances.empty:
        notes.append("no distances in the results (sweep.distances off?): no correlations")
    notes += too_few_points(corr)
    notes += [f"task {task}: a single α ({rows.alpha.iloc[0]:g}); no curve across α"
              for task, rows in scores.groupby("task") if rows.alpha.nunique() < 2]
    alphas = np.sort(scores.alpha.unique()) if len(scores) else np.array([options.alpha])
    alpha = float(alphas[np.argmin(np.abs(alphas - options.alpha))])
    return Analysis(results, all_merges, scores, best, corr, alpha, findings(all_merges, best, corr, alpha))


def without_alphaless(results: Results) -> Results:
    """The results less the merges without α (model_stock, sce: merged once), which the α-based tables,
    findings and figures cannot place; a note names them."""
    def merged_once(frame: pd.DataFrame) -> pd.Series:
        return (frame.method != UNMERGED) & frame.alpha.isna()

    once = merged_once(results.metrics)
    if not once.any():
        return results
    methods = ", ".join(sorted(set(results.metrics.method[once])))
    notes = results.notes + [f"merges without α ({methods}): left out of the α-based tables, findings and figures "
                             "(their rows are in the results)"]
    return dataclasses.replace(results, metrics=results.metrics[~once], items=results.items[~merged_once(results.items)],
                               notes=notes)


def concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The frames one below the other; no frames: an empty table with these columns."""
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def by_setting_and_task(scores: pd.DataFrame) -> Iterator[tuple[tuple[str, str, str], str, pd.DataFrame]]:
    """The scores table in parts: one merge setting of one experiment, one task."""
    for key, rows in scores.groupby([*SETTING, "task"], sort=True):
        yield key[:3], key[3], rows


def setting_label(experiment: str, method: str, params: str) -> str:
    return f"{experiment}: {setting_name(method, params)}"


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "-".join(map(str, parts))).strip("_")


def draw(a: Analysis, folder: Path) -> list[Section]:
    """Every figure as a PNG under `folder`, grouped in report sections."""
    curves, maps, fits = Section("Score by words seen"), Section("Score by checkpoint and α"), \
        Section("Distance against drop")
    fits = dataclasses.replace(fits, lead=f"Checkpoint pairs at α = {a.alpha:g}, whole-model distances between "
                                          "the twins' weights; each panel's line is the least-squares fit.")
    for setting, task, rows in by_setting_and_task(a.scores):
        label = setting_label(*setting)
        name = _slug(*setting[:2], task)
        curves.figures.append((f"{task}: {label}", plots.save(
            plots.score_vs_words(rows, f"{task} by words seen ({label})", chance(task, rows.metric.iloc[0])),
            folder / f"score_vs_words-{name}.png")))
        maps.figures.append((f"{task}: {label}", plots.save(
            plots.heatmap(rows, f"{task} ({label})"), folder / f"heatmap-{name}.png")))
        points = distance_points(rows, a.results.distances, a.alpha)
        if len(points):
            fits.figures.append((f"{task}: {label}", plots.save(plots.distance_vs_drop(
                points, f"{task}, α = {a.alpha:g} ({label})", f"drop in {task} {rows.metric.iloc[0]}"),
                folder / f"distance_vs_drop-{name}.png")))
    sections = [s for s in (curves, maps, fits) if s.figures]
    if len(a.results.training):
        sections.append(Section("Training", figures=[("loss of every run", plots.save(
            plots.training_curves(a.results.training), folder / "training_curves.png"))]))
    return sections


def distance_drops(scores: pd.DataFrame, distances: pd.DataFrame) -> pd.DataFrame:
    """Whole-model distances beside the drops: `scores`' rows, one per space and distance metric (columns
    space, distance_metric, distance)."""
    model = distances[distances.scope == "model"].drop(columns="scope")
    return scores.merge(model.rename(columns={"value": "distance", "metric": "distance_metric"}), on=CHECKPOINT_PAIR)


def distance_points(rows: pd.DataFrame, distances: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Whole-model weight distances beside the drop at α, one row per checkpoint pair and metric."""
    joined = distance_drops(rows[rows.alpha == alpha], distances)
    joined = joined[joined.space == "weights"]
    return joined[["distance_metric", "distance", "drop"]].rename(columns={"distance_metric": "metric"})


# The interactive views' sections (their titles: the PNG sections')
VIEW_LEADS = {
    "Score by checkpoint and α": "Each merge's score, its drop (the better twin's score minus the merge's) or its "
                                 "retention (the share of the text twin's advantage kept), per checkpoint pair and α.",
    "Score by words seen": "The same against the multimodal checkpoint's words seen, one line per α (the pairs at "
                           "equal words); the dotted grey line is the task's chance level.",
    "Distance against drop": "Whole-model distances between the twins against the drop across checkpoint pairs, the "
                             "experiments pooled as in correlations.csv (r, its 95% bootstrap interval and n in the "
                             "title); the line is the least-squares fit. The report's tables are at α = {alpha:g}.",
    "Training": "Training loss against words seen, one line per run.",
}
QUANTITIES = ("score", "drop", "retention")  # what the score views show (their selector "metric")


def quantity_label(quantity: str, task: str, metric: str) -> str:
    return {"score": f"{task} {metric}", "drop": f"drop in {task} {metric}",
            "retention": f"retention of the text twin's advantage on {task}"}[quantity]


def params_label(params: str) -> str:
    """A setting's parameters as the selectors name them (setting_name less the method)."""
    return setting_name("", params).strip() or "(none)"


def views(a: Analysis, paper_views: list[paper.View]) -> dict[str, interactive.View]:
    """The interactive views, one per figure kind (by the PNG sections' titles), from the analysis's tables."""
    maps, curves = [], []
    for (experiment, method, params), task, rows in by_setting_and_task(a.scores):
        label, metric = setting_label(experiment, method, params), rows.metric.iloc[0]
        for quantity in QUANTITIES:
            keys, y = (experiment, task, method, params_label(params), quantity), quantity_label(quantity, task, metric)
            maps.append((keys, interactive.heatmap(rows, quantity, f"{task} ({label})", y)))
            curves.append((keys, interactive.curves(
                interactive.words_table(rows, quantity), plots.MM_WORDS, f"{task} by words seen ({label})", y,
                chance=chance(task, metric) if quantity == "score" else None)))
    setting = ["experiment", "task", "method", "parameters", "metric"]
    out = {"Score by checkpoint and α": interactive.View("heatmap", setting, maps),
           "Score by words seen": interactive.View("score_vs_words", setting, curves),
           "Distance against drop": distance_view(a),
           "Training": interactive.View("training", ["experiment"], [
               ((experiment,), interactive.curves(
                   rows.pivot_table(index="words", columns="run", values="loss").rename_axis("words seen").reset_index(),
                   "words seen", f"training curves ({experiment})", "training loss"))
               for experiment, rows in a.results.training.groupby("experiment", sort=True)]),
           paper.TITLE: interactive.View("takmaz2025", ["experiment", "figure"], [
               ((v.experiment, v.name), interactive.curves(v.table, paper.WORDS, v.title, v.ylabel, dashed=v.dashed,
                                                           chance=v.chance)) for v in paper_views])}
    return {title: view.trimmed() for title, view in out.items() if view.figures}


def distance_view(a: Analysis) -> interactive.View:
    """Drop against each whole-model distance across checkpoint pairs, every experiment pooled as in the
    correlations (whose r, interval and n the title gives), per task, setting, α and space; first shown: the
    weights at the report's α, as the PNGs."""
    points = distance_drops(a.scores, a.results.distances).dropna(subset=["distance", "drop"])
    several = points.experiment.nunique() > 1
    corr = a.correlations[a.correlations.scope == "model"].set_index(
        ["task", "method", "method_params", "alpha", "space", "metric"])
    out = []
    for key, rows in points.groupby(["task", "method", "method_params", "alpha", "space", "distance_metric"],
                                    sort=True):
        task, method, params, alpha, space, metric = key
        r = corr.loc[key] if key in corr.index else None
        fitted = r is not None and np.isfinite(r.pearson)
        what = (f"r = {f3(r.pearson)} {ci(r.ci_low, r.ci_high)}, n = {int(r.n)}" if fitted else f"n = {len(rows)}, no r")
        shown = pd.DataFrame({"x": rows.distance, "y": rows["drop"], "label": [
            (f"{e}: " if several else "") + plots.pair_label(t, m)
            for e, t, m in zip(rows.experiment, rows.text_words, rows.mm_words)]})
        out.append(((task, method, params_label(params), f"{alpha:g}", space, metric), interactive.scatter_fit(
            shown, line_fit(shown.x, shown.y) if fitted else None,
            f"{task}, {setting_name(method, params)} at α = {alpha:g}: {metric.upper()} ({space}), {what}",
            f"{metric} distance ({space})", f"drop in {task} {rows.metric.iloc[0]}")))
    initial = next((keys for keys, _ in out if keys[3:5] == (f"{a.alpha:g}", "weights")), ())
    return interactive.View("distance_vs_drop", ["task", "method", "parameters", "α", "space", "distance"], out, initial)


def score_grid(rows: pd.DataFrame) -> pd.DataFrame:
    """Checkpoint pairs × α of one setting and task, with the twins' scores beside."""
    grid = rows.pivot_table(index=["text_words", "mm_words"], columns="alpha", values="score")
    grid.columns = [f"α={a:g}" for a in grid.columns]
    twins = rows.groupby(["text_words", "mm_words"])[["text_twin", "mm_twin"]].first()
    return grid.join(twins).reset_index()


def write_tables(a: Analysis, out: Path) -> dict[str, pd.DataFrame]:
    """scores, best_alpha and correlations as CSV and Markdown; returns the report's tables."""
    write_text(out / "scores.csv", a.scores.to_csv(index=False))
    write_text(out / "best_alpha.csv", a.best.to_csv(index=False))
    write_text(out / "correlations.csv", a.correlations.to_csv(index=False))
    grids = {f"{task}: {setting_label(*setting)}": score_grid(rows) for setting, task, rows in by_setting_and_task(a.scores)}
    write_text(out / "scores.md", "\n\n".join(f"## {k}\n\n{markdown_table(v)}" for k, v in grids.items()) + "\n")
    best = a.best.assign(setting=[setting_label(*k) for k in a.best[SETTING].itertuples(index=False)])
    best = best[["setting", *best.columns.drop(["setting", *SETTING, "text_run", "mm_run"])]]
    write_text(out / "best_alpha.md", markdown_table(best) + "\n")
    headline = a.correlations[(a.correlations.scope == "model") & (a.correlations.alpha == a.alpha)]
    headline = headline.drop(columns=["scope", "alpha"]).sort_values(["task", "space", "metric"])
    write_text(out / "correlations.md", markdown_table(headline) + "\n")
    write_text(out / "findings.md", to_markdown(a.findings))
    write_text(out / "findings.json", to_json(a.findings))
    return {"best": best, "headline": headline, **{f"grid:{k}": v for k, v in grids.items()}}


def analyze(results: Sequence[Path], out: Path, options: AnalysisConfig, runs: Sequence[Path] | None = None) -> Path:
    """Read, compute, draw and write everything into `out`; returns the report's path."""
    loaded = load(results, runs)
    finetuned = finetune_table(loaded, options.bootstrap, np.random.default_rng(options.seed))
    # the expert models have Sung et al.'s views (below), the fine-tuned models their table and findings
    a = compute(twin_results(without_finetune(loaded)), options)
    a.findings += finetune_findings(twin_results(loaded), options.bootstrap, np.random.default_rng(options.seed))
    drops, choices = probe_tables(a.results.metrics, options)
    a.findings += probe_findings(drops, choices, options.tolerance)
    a.findings = with_headlines(a.findings)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, out / "figures")  # what killed analyses left
    tables = write_tables(a, out)
    png, live = options.figures != "interactive", options.figures != "png"
    figures = draw(a, out / "figures") if png else []
    paper_section, paper_md, paper_views = paper.section(a.results, a.scores, out / "figures" if png else None)
    experiments = sorted(a.results.metrics.experiment.unique())
    pairs, settings = (len(a.scores[cols].drop_duplicates()) for cols in (CHECKPOINT_PAIR, SETTING))
    intro = (f"Experiment(s) {', '.join(experiments) or '(none)'}: {pairs} checkpoint pair(s), {settings} merge "
             f"setting(s), {len(a.merges)} task(s); multimodal tolerance {options.tolerance:g}, {options.bootstrap} "
             f"bootstrap resamples; generated {time.strftime('%Y-%m-%d %H:%M')}.")
    grids = [(k.removeprefix("grid:"), v) for k, v in tables.items() if k.startswith("grid:")]
    headline = headline_of(a.findings)
    findings_section = Section(
        "Findings", "The headline: the twins' largest gaps, the best merge by the best-α rule with what it keeps and "
        "loses, and the best predictor of the drop, at each experiment's last checkpoint pair with 95% bootstrap "
        "intervals (items resampled); a finding whose interval contains its null value says so. Every other finding "
        "follows by task (findings.md; findings.json flags the headline).",
        bullets=[f.text for f in headline] or ([] if a.findings else ["No findings."]),
        groups=[(task, [f.text for f in group]) for task, group in by_task(a.findings)])
    shown_views, script = {}, ""
    if live:
        shown_views = views(a, paper_views)
        script = interactive.script(list(shown_views.values()))
        if png:
            pngs = sum(len(s.figures) for s in figures) + (len(paper_section.figures) if paper_section else 0)
            intro += f" The figures as PNGs for papers: {pngs} in figures/."
    view_sections = [Section(title, VIEW_LEADS[title].format(alpha=a.alpha), html=[interactive.view_html(view)])
                     for title, view in shown_views.items() if title != paper.TITLE]
    middle = []
    if paper_section is not None:
        if paper.TITLE in shown_views:
            paper_section = dataclasses.replace(paper_section, figures=[],
                                                html=[interactive.view_html(shown_views[paper.TITLE])])
        middle.append(paper_section)
        write_text(out / "takmaz2025.md", paper_md)
    if len(finetuned):
        write_text(out / "finetune.csv", finetuned.to_csv(index=False))
        write_text(out / "finetune.md", markdown_table(finetuned) + "\n")
        middle.append(Section(
            "Fine-tuning", "BabyLM's (Super)GLUE fine-tuning of the twins and of the merges chosen in "
            "sweep.finetune, on the valid split of each task (the epoch of best valid score kept, as the "
            "pipeline does); accuracy's 95% bootstrap interval resamples the valid items (finetune.csv).",
            [("fine-tuning", finetuned)]))
    if len(drops):
        write_text(out / "probe_drops.csv", drops.to_csv(index=False))
        write_text(out / "probe_choices.csv", choices.to_csv(index=False))
        agreement = rank_agreement(drops)
        shown = choices.assign(setting=[setting_label(*k) for k in choices[SETTING].itertuples(index=False)])
        middle.append(Section(
            "Mergeability probe", "The probe's signals of every merge (held-out LM loss; caption loss with the true "
            "and with shuffled image features), mapped to each task's score by a line fitted on the twins (from the LM "
            "loss for a text task, the caption loss for a multimodal one), beside the "
            "full evaluation: Spearman's ρ of predicted against measured drops, and the probe's best α against the "
            "grid's (probe_drops.csv, probe_choices.csv).",
            [("predicted vs measured drops", agreement),
             ("best α: probe vs grid", shown[["setting", "mm_words", "task", "grid_best", "probe_best", "steps_apart"]])]))
    # a paper's results section: the headline findings, one figure per kind, then the tables; the PNGs alone
    # (one per task and setting) come last
    sections = [
        findings_section,
        *view_sections,
        Section("Best α per checkpoint", "The α with the highest text-task score whose largest multimodal drop "
                "stays within the tolerance; retention is the share of the text twin's advantage kept.",
                [("best α", tables["best"])]),
        *middle,
        Section("Scores by α", "Each merge's score; the twins' own scores on the right.", grids),
        Section("Correlations", f"Distance against drop across checkpoint pairs at α = {a.alpha:g}, whole model "
                "(every scope and α: correlations.csv); the interval is Pearson's 95% bootstrap interval.",
                [("distance vs drop", tables["headline"])]),
        *([] if live else figures),
    ]
    if sung.is_study(loaded.metrics):  # `vlmerge study`'s results: Sung et al.'s views beside
        sung_html = sung.sung_report(results, out, options)
        intro += f" Sung et al.'s views of the study: {sung_html.name}."
    title = "vlmerge report: " + (", ".join(experiments) or "no results")
    report = out / "report.html"
    write_text(report, html_report(title, intro, a.notes, sections, script))
    write_text(out / "summary.md", markdown_summary(title, intro, a.notes, [
        ("Best α per checkpoint", tables["best"]), (f"Correlations at α = {a.alpha:g} (whole model)",
                                                    tables["headline"]),
        *([("Fine-tuning", finetuned)] if len(finetuned) else [])], [f.text for f in headline],
        f"All {len(a.findings)} findings, by task: findings.md." if len(a.findings) > len(headline) else ""))
    return report
