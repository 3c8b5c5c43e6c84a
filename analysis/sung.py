"""Sung et al.'s (EMNLP 2023) views of `vlmerge study`'s results: no torch, core only.

A row of the study carries its model's study key in the `study` column (`vlmerge.modelkey.study_key`:
the expert variant and K_seed, or variant `maa`); the views are built from that column and the
model columns alone, never from experiment or folder names. A model is MAA (variant `maa`: the
agnostic model from scratch), MSA (an expert model, unmerged: method `none`) or a merge of an
expert model (`experts_<method>`; α weights the vision expert). Fine-tuned scores are tasks like
any other (`ft_vqa` …: Sung et al.'s protocol scores the models after fine-tuning). The drop of a merge on a task is MSA's score minus the merge's (sign-corrected: positive
= the merge is worse), with paired bootstrap replicates of the per-item scores
(`vlmerge.analysis.scores`). Views: merged vs MSA vs MAA (Tables 1/3), score and drop against
K_seed (Figure 3), each variant before and after merging (Figure 4), methods × hyper-parameters
(Table 2), and distance between W^l and W^v against the drop across K_seed, with Pearson's r and
its bootstrap interval (Table 5); then Findings, in plain sentences.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlmerge.analysis import plots
from vlmerge.analysis.correlations import correlate
from vlmerge.analysis.load import MODEL, Results, experiment_folders, load
from vlmerge.analysis.report import Section, html_report, markdown_summary
from vlmerge.analysis.scores import TaskMetric, task_metrics, task_scores
from vlmerge.config import AnalysisConfig
from vlmerge.io import write_text
from vlmerge.modelkey import EXPERT_METHOD_PREFIX, MAA_VARIANT, UNMERGED, expert_distance_run

# The merge of Figures 3 and 4 and Table 5: interpolation at α = 0.5 (as MB)
MAIN_METHOD, MAIN_ALPHA = EXPERT_METHOD_PREFIX + "interpolation", 0.5
NO_SEED = -1  # K_seed of MAA, which has no seed phase
DISTANCE_PAIR = (expert_distance_run("language"), expert_distance_run("vision"))  # W^l against W^v
DISTANCE_SCOPE = "transformer"


def label(method: str, params: str, alpha: float) -> str:
    """`MSA`, or `interpolation α=0.5`, `regmean α=0.75 gamma=0.9`, `arithmetic lam=1` …"""
    if method == "none":
        return "MSA"
    parts = [method.removeprefix(EXPERT_METHOD_PREFIX)]
    if alpha == alpha and alpha is not None:  # NaN: a method without α
        parts.append(f"α={alpha:g}")
    parts += [f"{k}={v:g}" for k, v in sorted(json.loads(params or "{}").items())]
    return " ".join(parts)


def study_scores(results: Results, tasks: list[TaskMetric], replicates: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per (model, task): variant, K_seed, model label, score, and the replicates as `reps`."""
    frames = []
    for tm in tasks:
        s = task_scores(results, tm, replicates, rng)
        keys = s.index.to_frame(index=False)
        keys["task"], keys["metric"], keys["sign"] = tm.task, tm.metric, tm.sign
        keys["score"] = s[0].to_numpy()
        keys["reps"] = list(s.to_numpy())
        frames.append(keys)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*MODEL, "task", "score"])
    study = results.metrics.drop_duplicates(MODEL).set_index(MODEL).study  # a model's study key, from its rows
    rows["study"] = study.reindex(pd.MultiIndex.from_frame(rows[MODEL])).to_numpy() if len(rows) else []
    rows = with_study_key(rows)
    rows["model"] = ["MAA" if v == MAA_VARIANT else label(m, p, a) for v, m, p, a in
                     zip(rows.variant, rows.method, rows.method_params, rows.alpha)]
    return rows


def with_study_key(frame: pd.DataFrame) -> pd.DataFrame:
    """The study's rows of `frame`, with their study key's fields as the columns variant and k_seed."""
    rows = frame[frame.study.fillna("").astype(str) != ""].copy()
    keys = [json.loads(k) for k in rows.study]
    rows["variant"] = [k["variant"] for k in keys]
    rows["k_seed"] = [int(k.get("k_seed", NO_SEED)) for k in keys]
    return rows.reset_index(drop=True)


def is_msa(rows: pd.DataFrame) -> pd.Series:
    """An expert model unmerged."""
    return (rows.method == UNMERGED) & (rows.variant != MAA_VARIANT)


def is_main_merge(rows: pd.DataFrame) -> pd.Series:
    return (rows.method == MAIN_METHOD) & np.isclose(rows.alpha.astype(float), MAIN_ALPHA)


def wide(rows: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Tasks as columns (score), `index` as rows."""
    if rows.empty:
        return pd.DataFrame(columns=index)
    out = rows.pivot_table(index=index, columns="task", values="score", aggfunc="first").reset_index()
    out.columns.name = None
    return out


def with_drops(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, K_seed, task): MSA, the main merge, and the drop (MSA − merge, sign-corrected)
    with its replicates."""
    msa = rows[is_msa(rows)].set_index(["variant", "k_seed", "task"])
    merged = rows[is_main_merge(rows)].set_index(["variant", "k_seed", "task"])
    both = msa.index.intersection(merged.index)
    out = pd.DataFrame(index=both).reset_index()
    out["msa"] = msa.loc[both, "score"].to_numpy()
    out["msa_reps"] = list(msa.loc[both, "reps"])
    out["merged"] = merged.loc[both, "score"].to_numpy()
    sign = msa.loc[both, "sign"].to_numpy()
    out["drop"] = sign * (out.msa - out.merged)
    out["drop_reps"] = [s * (np.asarray(a) - np.asarray(b)) for s, a, b in
                        zip(sign, msa.loc[both, "reps"], merged.loc[both, "reps"])]
    return out.sort_values(["variant", "k_seed", "task"]).reset_index(drop=True)


def main_table(rows: pd.DataFrame, k_max: int) -> pd.DataFrame:
    """Tables 1/3: MAA, MSA, MB (no seed, interpolation 0.5) and ours (longest seed, interpolation)."""
    ours = (rows.variant == "all") & (rows.k_seed == k_max)
    interp = ours & (rows.method == MAIN_METHOD)
    picks = [("MAA", rows.variant == MAA_VARIANT), ("MSA", ours & is_msa(rows)),
             ("MB", (rows.variant == "all") & (rows.k_seed == 0) & is_main_merge(rows))]
    picks += [(f"ours (interpolation α={a:g})", interp & np.isclose(rows.alpha.astype(float), a))
              for a in sorted(rows[interp].alpha.astype(float).unique())]
    parts = [wide(rows[mask], ["k_seed"]).assign(model=name) for name, mask in picks if mask.any()]
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    table["k_seed"] = table.k_seed.where(table.k_seed != NO_SEED)  # MAA has no seed phase: blank
    return table[["model", *table.columns.drop("model")]]


def drop_table(drops: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """MSA, merged and drop per task side by side."""
    out = drops.pivot_table(index=index, columns="task", values=["msa", "merged", "drop"], aggfunc="first")
    out.columns = [f"{task} {what}" for what, task in out.columns]
    return out[sorted(out.columns)].reset_index()


def distance_table(drops: pd.DataFrame, distances: pd.DataFrame) -> pd.DataFrame:
    """Table 5: each distance between W^l and W^v against the drop across K_seed (variant `all`)."""
    d = distances[(distances.text_run == DISTANCE_PAIR[0]) & (distances.mm_run == DISTANCE_PAIR[1])
                  & (distances.scope == DISTANCE_SCOPE)]
    d = with_study_key(d)
    d = d[d.variant == "all"]
    rows = []
    for (space, metric), dist in d.groupby(["space", "metric"]):
        for task, dr in drops[drops.variant == "all"].groupby("task"):
            joined = dr.merge(dist[["k_seed", "value"]], on="k_seed").sort_values("k_seed")
            if joined.empty:
                continue
            stats = correlate(joined.value.to_numpy(), np.stack(joined.drop_reps.to_numpy()))
            rows.append({"space": space, "metric": metric, "task": task, **stats,
                         "distances": ", ".join(f"{v:.4g}" for v in joined.value),
                         "drops": ", ".join(f"{v:.4g}" for v in joined["drop"])})
    return pd.DataFrame(rows)


def seed_figure(drops: pd.DataFrame) -> Figure:
    """Figure 3: MSA and the merge against K_seed, one panel per task."""
    tasks = sorted(drops.task.unique())
    fig = Figure(figsize=(4 * max(len(tasks), 1), 3.2), layout="constrained")
    for ax, task in zip(np.atleast_1d(fig.subplots(1, max(len(tasks), 1))), tasks):
        r = drops[drops.task == task].sort_values("k_seed")
        ax.plot(r.k_seed, r.msa, "o-", label="MSA (unmerged)")
        ax.plot(r.k_seed, r.merged, "s-", label=f"merged (interpolation α={MAIN_ALPHA:g})")
        ax.set_xlabel("seed pre-training (epochs)")
        ax.set_title(task)
        ax.set_xticks(sorted(r.k_seed.unique()))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small") if fig.axes else None
    return fig


def variant_figure(drops: pd.DataFrame) -> Figure:
    """Figure 4: each variant before (MSA) and after merging, one panel per task."""
    tasks = sorted(drops.task.unique())
    fig = Figure(figsize=(4 * max(len(tasks), 1), 3.2), layout="constrained")
    for ax, task in zip(np.atleast_1d(fig.subplots(1, max(len(tasks), 1))), tasks):
        r = drops[drops.task == task].sort_values("variant")
        x = np.arange(len(r))
        ax.bar(x - 0.2, r.msa, 0.4, label="before merging (MSA)")
        ax.bar(x + 0.2, r.merged, 0.4, label=f"after (interpolation α={MAIN_ALPHA:g})")
        ax.set_xticks(x, r.variant)
        ax.set_title(task)
        lo = min(r.msa.min(), r.merged.min())
        ax.set_ylim(lo - 0.1 * abs(lo) if lo < 0 else 0, None)
    fig.axes[0].legend(fontsize="small") if fig.axes else None
    return fig


def seed_trend(drops: Sequence[float]) -> str:
    """How the drops (shortest seed first) move: with every longer seed, only from end to end, or not."""
    if all(b < a for a, b in zip(drops, drops[1:])):
        return "shrinks with every longer seed"
    if drops[-1] < drops[0]:
        return "is smaller at the longest seed than at the shortest, but not at every step"
    return "does not shrink from the shortest to the longest seed"


def not_above_chance(seed_drops: pd.DataFrame, tasks: list[TaskMetric]) -> dict[str, str]:
    """Tasks with a chance level on which the unmerged expert model (MSA) is not above it at any seed
    length (the low end of its 95% bootstrap interval, or its score without replicates): there is no
    ability for merging to lose. Task -> the sentence that says so."""
    out = {}
    for tm in tasks:
        r = seed_drops[seed_drops.task == tm.task].sort_values("k_seed")
        if tm.chance is None or r.empty:
            continue
        lows = [np.percentile(reps[1:], 2.5) if len(reps) > 1 else reps[0] for reps in r.msa_reps]
        if all(tm.sign * (low - tm.chance) <= 0 for low in lows):
            scores = ", ".join(f"K={k}: {s:.4f}" for k, s in zip(r.k_seed, r.msa))
            out[tm.task] = (f"Not shown on {tm.task}: the unmerged expert model (MSA) is not above chance ({tm.chance:g}) "
                            f"at any seed length ({scores}), so merging has nothing to lose there; it is left out of "
                            "the findings below.")
    return out


def findings(seed_drops: pd.DataFrame, methods: pd.DataFrame, table5: pd.DataFrame,
             at_chance: dict[str, str] | None = None) -> list[str]:
    """The paper's three findings, each checked on these results in one sentence with its numbers;
    tasks in `at_chance` (`not_above_chance`) are said to show nothing, and left out."""
    at_chance = at_chance or {}
    out = list(at_chance.values())
    seed_drops = seed_drops[~seed_drops.task.isin(at_chance)]
    table5 = table5[~table5.task.isin(at_chance)] if len(table5) else table5
    for task, r in seed_drops.groupby("task"):
        r = r.sort_values("k_seed")
        steps = ", ".join(f"K={k}: {d:+.4f}" for k, d in zip(r.k_seed, r["drop"]))
        if len(r) < 2:
            out.append(f"Longer seed → smaller drop? Not shown: {task} has one seed length only ({steps}).")
            continue
        if r["drop"].iloc[0] <= 0:
            out.append(f"Longer seed → smaller drop? On {task} merging costs nothing even without a long seed, so "
                       f"there is no drop to shrink ({steps}).")
            continue
        out.append(f"Longer seed → smaller drop? On {task} the drop after merging {seed_trend(r['drop'].tolist())} "
                   f"({steps}).")
    if len(methods):
        for task in [c for c in methods.columns if c not in ("method", "model", *at_chance)]:
            best = methods.groupby("method")[task].max()
            if {"interpolation", "regmean"} <= set(best.index):
                gap = best["interpolation"] - best["regmean"]
                out.append(f"Interpolation vs RegMean on {task}: best interpolation {best['interpolation']:.4f}, best "
                           f"RegMean {best['regmean']:.4f} (difference {gap:+.4f}).")
    if len(table5):
        w = table5[table5.space == "weights"]
        ranking = w.groupby("metric").pearson.mean().sort_values(ascending=False)
        if ranking.notna().any():
            out.append(f"Best predictor of the drop: mean Pearson r over tasks (weights, n = {int(w.n.max())} seed "
                       f"lengths): " + ", ".join(f"{m} {r:+.3f}" for m, r in ranking.items())
                       + f"; the highest is {ranking.index[0]}" + (" (as Sung et al.)" if ranking.index[0] == "tssd"
                                                                    else " (Sung et al.: TSSD)")
                       + ". Per task, the highest r: " + "; ".join(best_per_task(w)) + ".")
    return out


def best_per_task(table5: pd.DataFrame) -> list[str]:
    """`task: metric r [interval]` of the distance with the highest Pearson r on each task."""
    out = []
    for task, rows in table5.dropna(subset=["pearson"]).groupby("task"):
        top = rows.sort_values("pearson", ascending=False).iloc[0]
        interval = f" [{top.ci_low:.2f}, {top.ci_high:.2f}]" if pd.notna(top.ci_low) else ""
        out.append(f"{task} {top.metric} {top.pearson:+.3f}{interval}")
    return out


def is_study(metrics: pd.DataFrame) -> bool:
    """Whether the results hold models of `vlmerge study`."""
    return bool((metrics.study.astype(str) != "").any())


def sung_report(results_dirs: Sequence[Path], out: Path, options: AnalysisConfig) -> Path:
    """Read the study's results, write its tables (CSV), figures and `sung.html` / `sung.md` into `out`."""
    results = load(results_dirs)
    notes = results.notes
    rng = np.random.default_rng(options.seed)
    tasks = task_metrics(results.metrics, options.text_tasks, options.multimodal_tasks, notes)
    rows = study_scores(results, tasks, options.bootstrap, rng)
    all_k = sorted(rows[(rows.variant == "all")].k_seed.unique())
    k_max = max(all_k) if all_k else 0
    drops = with_drops(rows)
    seed_drops = drops[drops.variant == "all"]
    variant_k = rows[rows.variant.isin(["attention", "ffn", "layernorm"])].k_seed
    variant_k = int(variant_k.iloc[0]) if len(variant_k) else k_max
    variant_drops = drops[drops.k_seed == variant_k]
    merges = rows[(rows.variant == "all") & (rows.k_seed == k_max) & (rows.method != UNMERGED)]
    methods = wide(merges.assign(method=merges.method.str.removeprefix(EXPERT_METHOD_PREFIX)), ["method", "model"])
    table5 = distance_table(drops, results.distances)
    tables = {
        "table1_merged_vs_msa_vs_maa": main_table(rows, k_max),
        "figure3_seed_length": drop_table(seed_drops, ["k_seed"]) if len(seed_drops) else pd.DataFrame(),
        "figure4_variants": drop_table(variant_drops, ["variant"]) if len(variant_drops) else pd.DataFrame(),
        "table2_methods": methods,
        "table5_distance_vs_drop": table5,
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        write_text(out / f"{name}.csv", frame.to_csv(index=False))
    figures = out / "figures"
    sections = [
        Section("Merged vs MSA vs MAA (Sung et al. Tables 1/3)",
                f"MAA: the agnostic model trained from scratch; MSA: the expert model (variant all, seed {k_max} "
                f"epochs), unmerged; MB: no seed, interpolation α={MAIN_ALPHA:g}; ours: seed {k_max} epochs, "
                "interpolation (α = the vision expert's weight).", [("scores", tables["table1_merged_vs_msa_vs_maa"])]),
        Section("Seed pre-training length (Figure 3)", "Every expert run trains the same total budget; K_seed of it "
                "is agnostic seed pre-training. Drop = MSA − merged (positive: merging costs).",
                [("by K_seed", tables["figure3_seed_length"])],
                [("score against K_seed", plots.save(seed_figure(seed_drops), figures / "figure3_seed_length.png"))]
                if len(seed_drops) else []),
        Section(f"Which modules are modality-specific (Figure 4, K_seed = {variant_k})",
                "all: attention, FFN and norms per modality; attention / ffn / layernorm: only those, the rest shared.",
                [("by variant", tables["figure4_variants"])],
                [("before and after merging", plots.save(variant_figure(variant_drops), figures / "figure4_variants.png"))]
                if len(variant_drops) else []),
        Section(f"Methods and hyper-parameters (Table 2, variant all, K_seed = {k_max})",
                "interpolation α; modality arithmetic λ (seed as base); RegMean α and γ with per-expert Grams.",
                [("scores", methods)]),
        Section("Distance between the experts against the drop (Table 5)",
                f"Across K_seed (variant all): distance between W^l and W^v over the transformer layers, against the "
                f"drop of interpolation α={MAIN_ALPHA:g}; interval: 95% percentile bootstrap of the items.",
                [("Pearson r", table5)]),
    ]
    found = findings(seed_drops, methods, table5, not_above_chance(seed_drops, tasks))
    sections.append(Section("Findings", " ".join(found) if found else "No findings: the results lack the views."))
    title = "Sung et al. (2023) on " + ", ".join(f.name for d in results_dirs for f in experiment_folders(Path(d)))
    intro = (f"{rows.experiment.nunique()} experiment(s), {len(tasks)} task(s), {options.bootstrap} bootstrap "
             f"resamples; generated {time.strftime('%Y-%m-%d %H:%M')}.")
    report = out / "sung.html"
    write_text(report, html_report(title, intro, notes, sections))
    write_text(out / "sung.md", markdown_summary(title, intro, notes, [(s.title, t) for s in sections[:-1]
                                                                       for _, t in s.tables[:1]])
               + "\n## Findings\n\n" + "\n".join(f"- {f}" for f in found) + "\n")
    return report
