"""The figures: each function takes a tidy table and returns a matplotlib Figure (no pyplot state).

Tests read the figures' data back (lines, images); `save` writes a PNG atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from vlmerge.analysis.stats import line_fit, pearson
from vlmerge.io import atomic_path

DPI = 110
ALPHA_COLOURS = colormaps["viridis"]
MM_WORDS = "words seen (multimodal checkpoint)"


def log_words(words: pd.Series) -> bool:
    """Whether an axis of words seen is drawn on a log scale: positive words over at least a factor of 20."""
    return bool(words.min() > 0 and words.max() / words.min() >= 20)


def _words_axis(ax, words: pd.Series, label: str) -> None:
    ax.set_xlabel(label)
    if log_words(words):
        ax.set_xscale("log")


def equal_words(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of checkpoint pairs at equal words, where there are such (all_pairs pairing); else all."""
    same = table[table.text_words == table.mm_words]
    return same if len(same) else table


def score_vs_words(table: pd.DataFrame, title: str, chance: float | None = None) -> Figure:
    """One line per α: the merge's score against the words seen (the poster's figure).

    `table` is one setting's rows of Merges.table(); x is the multimodal checkpoint's words
    (with all_pairs pairing, only the pairs at equal words are drawn). `chance`: a dashed line
    at the score of guessing.
    """
    table = equal_words(table)
    metric = f"{table.task.iloc[0]} {table.metric.iloc[0]}"
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for alpha, rows in table.sort_values("mm_words").groupby("alpha"):
        ax.plot(rows.mm_words, rows.score, marker="o", markersize=3, color=ALPHA_COLOURS(alpha), label=f"α = {alpha:g}")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3g})")
    _words_axis(ax, table.mm_words, MM_WORDS)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="text weight", fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def heatmap(table: pd.DataFrame, title: str) -> Figure:
    """Score per checkpoint pair (rows) and α (columns), the values written in the cells."""
    grid = table.pivot_table(index=["text_words", "mm_words"], columns="alpha", values="score")
    fig = Figure(figsize=(max(6.0, 0.6 * grid.shape[1] + 2.5), max(3.0, 0.4 * grid.shape[0] + 1.8)),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma")
    ax.set_xticks(range(grid.shape[1]), [f"{a:g}" for a in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [pair_label(t, m) for t, m in grid.index])
    ax.set_xlabel("α (weight of the text-only model)")
    ax.set_ylabel("checkpoint (words seen)")
    ax.set_title(title)
    if grid.size <= 300:
        mid = np.nanmean(grid.to_numpy())
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    fig.colorbar(image, ax=ax, label=f"{table.task.iloc[0]} {table.metric.iloc[0]}")
    return fig


def pair_label(text_words: int, mm_words: int) -> str:
    """A checkpoint pair by its words seen: one number where the twins saw the same."""
    return f"{text_words:,}" if text_words == mm_words else f"text {text_words:,} / mm {mm_words:,}"


def distance_vs_drop(points: pd.DataFrame, title: str, drop_label: str) -> Figure:
    """One panel per distance metric: drop against distance over checkpoint pairs, with the least-squares line."""
    metrics = sorted(points.metric.unique())
    fig = Figure(figsize=(3.2 * max(1, len(metrics)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rows = points[points.metric == metric].dropna(subset=["distance", "drop"])
        x, y = rows["distance"].to_numpy(), rows["drop"].to_numpy()  # ("drop" is also a DataFrame method)
        ax.scatter(x, y, s=18, label="checkpoint pairs")
        r = float(pearson(x, y))
        if np.isfinite(r):
            slope, intercept = line_fit(x, y)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, slope * xs + intercept, color="tab:red", label="least squares")
        ax.set_title(f"{metric.upper()}: r = {r:.3f} (n = {len(rows)})" if np.isfinite(r) else
                     f"{metric.upper()}: n = {len(rows)}, no r", fontsize="medium")
        ax.set_xlabel(f"{metric} distance")
        ax.set_ylabel(drop_label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def curves(table: pd.DataFrame, x: str, title: str, ylabel: str, *, dashed: str | None = None,
           chance: float | None = None) -> Figure:
    """One line per column of `table` but `x` against `x` (words seen); the `dashed` column in black,
    dashed (an unmerged twin beside merges); `chance`: a grey line at the score of guessing."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    table = table.sort_values(x)
    lines = [c for c in table.columns if c != x]
    for k, column in enumerate(lines):
        style = (dict(color="black", linestyle="--") if column == dashed else
                 dict(color=ALPHA_COLOURS(k / max(1, len(lines) - 1))))
        rows = table[[x, column]].dropna()
        ax.plot(rows[x], rows[column], marker="o", markersize=3, label=column, **style)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3g})")
    _words_axis(ax, table[x], x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def training_curves(training: pd.DataFrame) -> Figure:
    """Loss against words seen, one line per run."""
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    several = training.experiment.nunique() > 1
    for (experiment, run), rows in training.sort_values("words").groupby(["experiment", "run"]):
        ax.plot(rows.words, rows.loss, label=f"{experiment}/{run}" if several else run)
    _words_axis(ax, training.words, "words seen")
    ax.set_ylabel("training loss")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as a PNG (atomically) and return its path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path
