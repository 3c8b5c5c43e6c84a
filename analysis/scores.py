"""Each model's score on a task, with bootstrap replicates recomputed from the per-item scores.

A task is scored by one metric (`analysis.text_tasks` / `analysis.multimodal_tasks`); a key
"task/subtask" scores one subtask of a task as a task of its own (e.g. Winoground's
"winoground/tag:attribute" items apart from its "winoground/tag:binding" ones). A score
frame has one row per model (index: load.MODEL) and columns 0..B: column 0 is the reported
value, columns 1..B the same statistic on resamples of the task's items. The resamples are
paired (every model sees the same draw), so drops and correlations computed column by column
carry the items' sampling noise into their intervals.

The items are aggregated the way the task did: BLiMP-style tasks average their subtasks'
accuracies (items resampled within each subtask), others average all items. Which one is
checked against the reported values; when neither reproduces them, no intervals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from vlmerge.analysis.load import MODEL, Results
from vlmerge.analysis.stats import resample_counts
from vlmerge.predict import PROBE
from vlmerge.results import LOWER_IS_BETTER

# What guessing scores, by (task, metric): two-way choices 1/2; Winoground's text and image
# scores 1/4 and group score 1/6 (Thrush et al. 2022); BabyLM's VQA picks among 8 answers.
CHANCE = {
    **{(task, "accuracy"): 0.5 for task in ("blimp", "blimp_supplement", "minimal_pairs", "ewok")},
    **{(task, metric): p for task in ("winoground", "winoground_full") for metric, p in
       {"unpaired_accuracy": 0.5, "text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6}.items()},
    ("vqa", "accuracy"): 1 / 8,
    ("ft_nlvr2", "accuracy"): 0.5,  # true or false, balanced (NLVR², and the demo's set by construction)
}
CHUNK = 128  # replicates drawn at a time: bounds the counts matrix to CHUNK × items


def chance(task: str, metric: str) -> float | None:
    """The score of guessing on a task ("task" or "task/subtask") by a metric, where it has one."""
    return CHANCE.get((task.partition("/")[0], metric))


@dataclasses.dataclass(frozen=True)
class TaskMetric:
    """A task, the metric that scores it, and which twin it favours."""

    task: str  # a task, or "task/subtask" for one subtask of it
    metric: str
    kind: str  # "text" or "multimodal"

    @property
    def source(self) -> tuple[str, str]:
        """The (task, subtask) of the result rows: subtask "" is the whole task."""
        task, _, subtask = self.task.partition("/")
        return task, subtask

    @property
    def chance(self) -> float | None:
        return chance(self.task, self.metric)

    @property
    def sign(self) -> int:
        """+1 when higher is better, -1 when lower is (perplexity)."""
        return -1 if self.metric in LOWER_IS_BETTER else 1

    @property
    def label(self) -> str:
        return f"{self.task} {self.metric}"


def task_metrics(metrics: pd.DataFrame, text: dict[str, str], multimodal: dict[str, str],
                 notes: list[str]) -> list[TaskMetric]:
    """The scored tasks present in the results, text tasks first; the others become notes."""
    present = metrics.groupby(["task", "subtask"], sort=True)["metric"].unique()
    out = []
    for task in present.index.get_level_values("task").unique():
        wanted = [k for k in (*text, *multimodal) if k.partition("/")[0] == task]
        if task == PROBE:
            continue  # the probe's signals, no task: the probe section compares them with the scores
        if not wanted:
            notes.append(f"task {task}: in neither analysis.text_tasks nor analysis.multimodal_tasks; left out")
        for key in wanted:
            kind, metric = ("text", text[key]) if key in text else ("multimodal", multimodal[key])
            tm = TaskMetric(key, metric, kind)
            have = present.get(tm.source, [])
            if metric not in have:
                notes.append(f"task {key}: no {metric!r} rows (it has {', '.join(sorted(have)) or 'none'}); left out")
            else:
                out.append(tm)
    return sorted(out, key=lambda t: (t.kind != "text", t.task))


def reported(metrics: pd.DataFrame, tm: TaskMetric) -> pd.Series:
    """The reported value of every model (index: MODEL)."""
    task, subtask = tm.source
    rows = metrics[(metrics.task == task) & (metrics.metric == tm.metric) & (metrics.subtask == subtask)]
    return rows.set_index(MODEL)["value"].sort_index()


def metric_items(items: pd.DataFrame, tm: TaskMetric) -> pd.DataFrame:
    """The task's per-item scores of this metric: ids that name a metric (Winoground's
    `<item>/image_score`) are kept only for theirs; ids that name none belong to every metric.
    A subtask's score keeps that subtask's items only."""
    task, subtask = tm.source
    rows = items[(items.task == task) & ((items.subtask == subtask) if subtask else True)]
    segments = rows.example_id.str.split("/")
    names_metric = segments.map(lambda parts: tm.metric in parts)
    return rows[names_metric] if names_metric.any() else rows


def aggregate(values: np.ndarray, strata: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per model [M] and draw [R]: the mean over strata of the count-weighted item mean in each."""
    out = np.zeros((values.shape[0], counts.shape[0]))
    labels = np.unique(strata)
    for s in labels:
        members = strata == s
        out += values[:, members] @ counts[:, members].T / members.sum()
    return out / labels.size


def task_scores(results: Results, tm: TaskMetric, replicates: int, rng: np.random.Generator) -> pd.DataFrame:
    """The score frame of one task (see the module docstring); notes go to results.notes."""
    value = reported(results.metrics, tm)
    data = np.full((len(value), replicates + 1), np.nan)
    data[:, 0] = value.to_numpy()
    if replicates:
        note = _bootstrap(metric_items(results.items, tm), value.index, data, rng)
        if note:
            results.notes.append(f"{tm.label}: {note}")
    return pd.DataFrame(data, index=value.index)


def _bootstrap(rows: pd.DataFrame, models: pd.MultiIndex, data: np.ndarray, rng: np.random.Generator) -> str:
    """Fill data[:, 1:] with the resampled scores of the models that have every item; a note when not all do."""
    if rows.empty:
        return "no per-item scores; no bootstrap intervals"
    ids, columns = pd.factorize(rows.example_id)
    model_rows = models.get_indexer(pd.MultiIndex.from_frame(rows[MODEL]))
    keep = model_rows >= 0
    values = np.full((len(models), len(columns)), np.nan)
    values[model_rows[keep], ids[keep]] = rows.value.to_numpy()[keep]
    complete = ~np.isnan(values).any(axis=1)
    subtask = rows.drop_duplicates("example_id").set_index("example_id").subtask.reindex(columns).to_numpy()
    strata = _strata(values[complete], subtask, data[complete, 0])
    if strata is None:
        return "the per-item scores do not reproduce the reported values; no bootstrap intervals"
    replicates = data.shape[1] - 1
    for start in range(1, replicates + 1, CHUNK):
        stop = min(start + CHUNK, replicates + 1)
        data[complete, start:stop] = aggregate(values[complete], strata, resample_counts(strata, stop - start, rng))
    return "" if complete.all() else f"{int((~complete).sum())} model(s) lack per-item scores; no intervals for them"


def _strata(values: np.ndarray, subtask: np.ndarray, reported_values: np.ndarray) -> np.ndarray | None:
    """Per subtask (a macro mean) or one stratum (a plain mean): whichever reproduces the reports."""
    for strata in (pd.factorize(subtask)[0], np.zeros(subtask.size, dtype=np.int64)):
        full = aggregate(values, strata, np.ones((1, subtask.size)))[:, 0]
        if np.allclose(full, reported_values, rtol=0, atol=1e-9):
            return strata
    return None
