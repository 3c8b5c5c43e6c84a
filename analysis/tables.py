"""Merges beside their twins: score, performance drop and retention per pair, α and task; the best α.

docs/architecture.md ("Results"): the performance drop of a merge on a task is the score of the
better unmerged twin of its pair minus the merged score (a lower-is-better metric is negated first). Retention is the
share of the text twin's advantage over the multimodal twin that the merge keeps:
(merged − mm) / (text − mm). Every quantity is computed on all columns of a score frame at once
(column 0 the reported values, the others bootstrap replicates).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from vlmerge.analysis.load import MODEL, NO_WORDS, PAIR
from vlmerge.results import MM_ALPHA, TEXT_ALPHA, UNMERGED
from vlmerge.analysis.scores import TaskMetric

MIN_ADVANTAGE = 1e-12  # a text twin this close to the multimodal one has no advantage to retain
SCORE_COLUMNS = [*PAIR, "alpha", "task", "metric", "score", "text_twin", "mm_twin", "drop", "retention"]
BEST_COLUMNS = [*PAIR, "task", "metric", "best_alpha", "score", "retention", "mm_drop", "text_twin", "mm_twin"]


@dataclasses.dataclass(frozen=True)
class Merges:
    """One task's merged models (rows: PAIR + alpha, in `keys`) and their arrays [rows, replicates + 1]."""

    task: TaskMetric
    keys: pd.DataFrame
    score: np.ndarray
    text: np.ndarray
    mm: np.ndarray

    @property
    def drop(self) -> np.ndarray:
        s = self.task.sign
        return np.maximum(s * self.text, s * self.mm) - s * self.score

    @property
    def retention(self) -> np.ndarray:
        advantage = self.text - self.mm
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.abs(advantage) > MIN_ADVANTAGE, (self.score - self.mm) / advantage, np.nan)

    def table(self) -> pd.DataFrame:
        """The reported values (column 0) as a long table."""
        return self.keys.assign(task=self.task.task, metric=self.task.metric, score=self.score[:, 0],
                                text_twin=self.text[:, 0], mm_twin=self.mm[:, 0], drop=self.drop[:, 0],
                                retention=self.retention[:, 0])


def twin_keys(keys: pd.DataFrame, run: str) -> pd.MultiIndex:
    """The unmerged twin of each merged row (ModelKey.twin: method 'none', the twin's α)."""
    n = len(keys)
    text = run == "text"
    return pd.MultiIndex.from_arrays([
        keys.experiment, [UNMERGED] * n, ["{}"] * n,
        keys.text_run if text else [""] * n, [""] * n if text else keys.mm_run,
        keys.text_words if text else [NO_WORDS] * n, [NO_WORDS] * n if text else keys.mm_words,
        [TEXT_ALPHA if text else MM_ALPHA] * n,
    ], names=MODEL)


def merges(scores: pd.DataFrame, task: TaskMetric) -> Merges:
    """The merged rows of a score frame beside their twins (NaN where a twin was not evaluated)."""
    merged = scores[scores.index.get_level_values("method") != UNMERGED]
    keys = merged.index.to_frame(index=False)
    return Merges(task, keys, merged.to_numpy(),
                  scores.reindex(twin_keys(keys, "text")).to_numpy(),
                  scores.reindex(twin_keys(keys, "mm")).to_numpy())


def multimodal_drop(all_merges: list[Merges]) -> pd.Series:
    """Per merged model (PAIR + alpha): the largest drop over the multimodal tasks."""
    drops = [m.keys.assign(drop=m.drop[:, 0]) for m in all_merges if m.task.kind == "multimodal"]
    if not drops:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=[*PAIR, "alpha"]))
    return pd.concat(drops).groupby([*PAIR, "alpha"])["drop"].max()


def best_alpha(text: Merges, mm_drop: pd.Series, tolerance: float) -> pd.DataFrame:
    """Per pair: the α with the highest text-task score whose multimodal drop is within tolerance.

    Ties go to the smaller α (more of the multimodal model). Without multimodal tasks every α
    qualifies. A pair where none qualifies gets NaN.
    """
    table = text.table()
    if len(mm_drop):
        table["mm_drop"] = mm_drop.reindex(pd.MultiIndex.from_frame(table[[*PAIR, "alpha"]])).to_numpy()
        ok = table[table.mm_drop <= tolerance]
    else:
        table["mm_drop"] = np.nan
        ok = table
    ok = ok.assign(oriented=text.task.sign * ok.score).sort_values(["oriented", "alpha"], ascending=[False, True])
    best = ok.drop_duplicates(PAIR).drop(columns="oriented").rename(columns={"alpha": "best_alpha"})
    pairs = table[PAIR].drop_duplicates()
    out = pairs.merge(best, on=PAIR, how="left").assign(task=text.task.task, metric=text.task.metric)
    return out[BEST_COLUMNS]
