"""Predicting a merge's scores from the mergeability probe, and the adaptive search that uses it.

**The predictor.** From probe signals (`vlmerge.evaluate.probe`) to task scores: one least-squares
line per task, fitted on models scored in full (the twins of every checkpoint: the sweep scores
them in any case), with a prediction interval for each new model. A text task is read from the
held-out LM loss, a multimodal task from the caption loss with the true images (`FEATURES`).

    score ≈ β₀ + β·signal,   interval ŷ ± t(level, n−p)·s·√(1 + x (XᵀX)⁻¹ xᵀ)

The twins of a sweep span the signals: the held-out loss from early to late checkpoints, the
caption loss from the text twin's (it never saw an image) to the multimodal twin's. A merge is
scored by where its signals fall on those lines.

**The adaptive search** of one pair's α grid (`sweep.search: adaptive`) looks for the best α as the
analysis picks it: the highest score on the search task among the α whose multimodal drop (the
largest over analysis.multimodal_tasks, against the better twin) is within analysis.tolerance; ties
go to the smaller α.

1. The predicted best α and its grid neighbours are evaluated in full.
2. While the measured best has a grid neighbour not evaluated, that neighbour is (the prediction
   was off: follow the measurements).
3. Then, while evaluations stay within `budget` (a share of the grid), the α whose prediction
   interval leaves it a chance to beat the measured best is evaluated, the most promising first;
   while no α measured is within tolerance, the α whose interval leaves it a chance to be, the
   smallest predicted drop first. None left: the search ends (with no α within tolerance, the
   analysis's answer too).

The twins, which every drop is measured against, are scored in any search (once per checkpoint).
numpy and scipy only: the analysis uses it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from vlmerge.config import Config
from vlmerge.errors import VlmergeError
from vlmerge.results import LOWER_IS_BETTER

PROBE = "probe"  # the task name of the probe's result rows (vlmerge.evaluate.probe)
# The probe signal each kind of task is predicted from. With a dozen twins to fit, one signal a line:
# two (the LM loss and grounding) fitted the demo's twins closer and ranked its merges' drops worse.
FEATURES = {"text": ("lm_loss",), "multimodal": ("caption_loss",)}


@dataclasses.dataclass(frozen=True)
class Fit:
    """A fitted line: coefficients [1 + features], (XᵀX)⁻¹, residual variance and its degrees of freedom."""

    coef: np.ndarray
    xtx_inv: np.ndarray
    s2: float
    dof: int

    def predict(self, signals: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, low, high) of the scores of models with these signals [m, features]."""
        x = design(signals)
        mean = x @ self.coef
        if self.dof <= 0:
            return mean, np.full_like(mean, -np.inf), np.full_like(mean, np.inf)
        half = stats.t.ppf(0.5 + level / 2, self.dof) * np.sqrt(self.s2 * (1 + np.einsum("ij,jk,ik->i", x, self.xtx_inv, x)))
        return mean, mean - half, mean + half


def design(signals: np.ndarray) -> np.ndarray:
    signals = np.atleast_2d(np.asarray(signals, dtype=np.float64))
    return np.hstack([np.ones((len(signals), 1)), signals])


def fit(signals: np.ndarray, scores: np.ndarray) -> Fit:
    """The least-squares line of `scores` [n] on `signals` [n, features]."""
    x, y = design(signals), np.asarray(scores, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    xtx_inv = np.linalg.pinv(x.T @ x)
    dof = len(y) - x.shape[1]
    s2 = float(np.sum((y - x @ coef) ** 2) / dof) if dof > 0 else np.inf
    return Fit(coef, xtx_inv, s2, dof)


# -- targets and the predictor over result rows -------------------------------------------------

Rows = Sequence[Mapping]  # one model's result rows (task, subtask, metric, value)


@dataclasses.dataclass(frozen=True)
class Target:
    """A task ("task" or "task/subtask"), its metric, and its kind (text or multimodal: which probe
    signals predict it); sign +1 where higher is better."""

    key: str
    metric: str
    kind: str = "text"

    @property
    def features(self) -> tuple[str, ...]:
        return FEATURES[self.kind]

    @property
    def sign(self) -> int:
        return -1 if self.metric in LOWER_IS_BETTER else 1

    def value(self, rows: Rows) -> float:
        """Its oriented value (higher is better) in one model's rows; NaN where the rows have none."""
        task, _, subtask = self.key.partition("/")
        values = [r["value"] for r in rows if (r["task"], r["subtask"], r["metric"]) == (task, subtask, self.metric)]
        return self.sign * float(values[0]) if values else math.nan


def targets(cfg: Config) -> tuple[Target, list[Target]]:
    """(the search task, the multimodal tasks)."""
    task = cfg.sweep.search_task
    if task not in cfg.analysis.text_tasks:
        raise VlmergeError(f"sweep.search_task {task!r}: not in analysis.text_tasks (known: "
                           f"{', '.join(cfg.analysis.text_tasks)}); it names the metric the search maximises")
    return Target(task, cfg.analysis.text_tasks[task]), multimodal_targets(cfg.analysis.multimodal_tasks)


def multimodal_targets(tasks: Mapping[str, str]) -> list[Target]:
    """analysis.multimodal_tasks as targets."""
    return [Target(k, m, "multimodal") for k, m in tasks.items()]


def signals(rows: Rows, features: Sequence[str]) -> np.ndarray:
    """These probe signals of a model, from its probe rows (NaN where missing)."""
    return np.array([Target(PROBE, name).value(rows) for name in features])


@dataclasses.dataclass(frozen=True)
class Predictor:
    """One fitted line per target, on the twins (calibration: each twin's result rows)."""

    text: Target
    multimodal: list[Target]
    fits: dict[str, Fit]

    @classmethod
    def fitted(cls, text: Target, multimodal: list[Target], calibration: Sequence[Rows]) -> Predictor:
        """Fitted on the twins' rows (`calibration`); a multimodal target they do not score is left out."""
        fits = {}
        for t in [text, *multimodal]:
            x = np.array([signals(rows, t.features) for rows in calibration]).reshape(len(calibration), -1)
            y = np.array([t.value(rows) for rows in calibration])
            keep = ~np.isnan(y) & ~np.isnan(x).any(axis=1)
            if keep.sum() > len(t.features) + 1:
                fits[t.key] = fit(x[keep], y[keep])
        if text.key not in fits:
            raise VlmergeError(f"sweep.search_task {text.key}: too few twins scored on it ({len(calibration)} "
                               "checkpoints) to fit the probe's predictor")
        return cls(text, [t for t in multimodal if t.key in fits], fits)

    @staticmethod
    def reference(target: Target, twins: tuple[Rows, Rows]) -> float:
        """The better twin's oriented value: what a drop is measured against."""
        return max(target.value(twins[0]), target.value(twins[1]))

    def measured(self, rows: Rows, twins: tuple[Rows, Rows]) -> Outcome:
        drops = [self.reference(t, twins) - t.value(rows) for t in self.multimodal]
        return Outcome(self.text.value(rows), max(drops, default=0.0))

    def drops(self, rows: Rows, twins: tuple[Rows, Rows]) -> dict[str, tuple[float, float]]:
        """Per target, the search task first: (predicted, measured) drop of a merge with probe and task rows."""
        return {t.key: (self.reference(t, twins) - self.score(t, rows)[0], self.reference(t, twins) - t.value(rows))
                for t in [self.text, *self.multimodal]}

    def score(self, target: Target, probe_rows: Rows) -> tuple[float, float, float]:
        """(mean, low, high) of a target's oriented score the probe's signals predict."""
        mean, low, high = self.fits[target.key].predict(signals(probe_rows, target.features)[None])
        return float(mean[0]), float(low[0]), float(high[0])

    def predicted(self, probe_rows: Rows, twins: tuple[Rows, Rows]) -> Outcome:
        """The outcome the probe's signals predict, with the optimistic ends of the intervals."""
        score, _, high = self.score(self.text, probe_rows)
        drops, lows = [], []
        for t in self.multimodal:
            mean, _, hi = self.score(t, probe_rows)
            drops.append(self.reference(t, twins) - mean)
            lows.append(self.reference(t, twins) - hi)
        return Outcome(score, max(drops, default=0.0), high, max(lows, default=0.0))


# -- the adaptive search --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Outcome:
    """The search task's score and the multimodal drop of one α, measured or predicted (with intervals)."""

    score: float
    mm_drop: float
    score_high: float = math.nan  # predicted: the interval's optimistic ends
    mm_drop_low: float = math.nan


def best_alpha(outcomes: Mapping[float, Outcome], tolerance: float) -> float | None:
    """The analysis's rule: the highest score whose drop is within tolerance, ties to the smaller α."""
    ok = [(-o.score, a) for a, o in outcomes.items() if o.mm_drop <= tolerance and not math.isnan(o.score)]
    return min(ok)[1] if ok else None


def first_alphas(grid: Sequence[float], predicted: Mapping[float, Outcome], tolerance: float) -> list[float]:
    """The predicted best α (or, none within tolerance, the one of the smallest predicted drop) and its neighbours."""
    best = best_alpha(predicted, tolerance)
    if best is None:
        best = min(grid, key=lambda a: (predicted[a].mm_drop, a))
    return neighbourhood(grid, best)


def neighbourhood(grid: Sequence[float], alpha: float) -> list[float]:
    i = list(grid).index(alpha)
    return [grid[j] for j in (i, i - 1, i + 1) if 0 <= j < len(grid)]


def next_alphas(grid: Sequence[float], measured: Mapping[float, Outcome], predicted: Mapping[float, Outcome],
                tolerance: float, budget: float) -> list[float]:
    """What to evaluate next given what is measured ([] when the search is done)."""
    best = best_alpha(measured, tolerance)
    if best is not None:
        missing = [a for a in neighbourhood(grid, best) if a not in measured]
        if missing:
            return missing
    if len(measured) + 1 > budget * len(grid):  # one more would leave the budget
        return []
    left = [a for a in grid if a not in measured and predicted[a].mm_drop_low <= tolerance]
    if best is None:  # nothing measured within tolerance: the α most likely to be, if any may be
        return sorted(left, key=lambda a: (predicted[a].mm_drop, a))[:1]
    hopeful = [a for a in left if predicted[a].score_high > measured[best].score]
    return sorted(hopeful, key=lambda a: (-predicted[a].score, a))[:1]
