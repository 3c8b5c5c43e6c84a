"""Does a weight distance predict the damage of merging? (Sung et al. 2023, §7.)

Across checkpoint pairs (of every experiment given), Pearson and Spearman between each
distance (metric × space × scope, from `distances/`) and the performance drop of the merge, per
task, merge method and α. The 95% interval is the percentile interval of Pearson's r over the
bootstrap replicates of the drops (items resampled, the distances fixed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlmerge.analysis.load import CHECKPOINT_PAIR
from vlmerge.analysis.stats import MIN_POINTS, pearson, percentile_interval, spearman
from vlmerge.analysis.tables import Merges

COLUMNS = ["metric", "space", "scope", "task", "task_metric", "method", "method_params", "alpha", "pearson",
           "spearman", "ci_low", "ci_high", "n"]


def correlate(distance: np.ndarray, drops: np.ndarray) -> dict[str, float]:
    """r, ρ and Pearson's 95% interval of one distance [n] against drops [n, 1 + replicates]."""
    r_all = pearson(distance, drops.T)
    low, high = percentile_interval(r_all[1:])
    return {"pearson": float(r_all[0]), "spearman": float(spearman(distance, drops[:, 0])),
            "ci_low": low, "ci_high": high, "n": int(distance.size)}


def correlations(merges: Merges, distances: pd.DataFrame) -> pd.DataFrame:
    """Every (distance, method, α) correlation of one task; rows of `COLUMNS`."""
    if distances.empty:
        return pd.DataFrame(columns=COLUMNS)
    wide = distances.pivot_table(index=CHECKPOINT_PAIR, columns=["metric", "space", "scope"], values="value")
    rows = []
    for (method, params, alpha), at in merges.keys.groupby(["method", "method_params", "alpha"]).groups.items():
        at = np.asarray(at)
        drops = merges.drop[at]
        x_all = wide.reindex(pd.MultiIndex.from_frame(merges.keys.loc[at, CHECKPOINT_PAIR])).to_numpy()
        for j, (metric, space, scope) in enumerate(wide.columns):
            ok = np.isfinite(x_all[:, j]) & np.isfinite(drops[:, 0])
            rows.append({"metric": metric, "space": space, "scope": scope, "task": merges.task.task,
                         "task_metric": merges.task.metric, "method": method, "method_params": params, "alpha": alpha,
                         **correlate(x_all[ok, j], drops[ok])})
    return pd.DataFrame(rows, columns=COLUMNS)


def too_few_points(table: pd.DataFrame) -> list[str]:
    """Notes for the tasks whose correlations have fewer than MIN_POINTS checkpoint pairs."""
    short = table[table.n < MIN_POINTS].groupby(["task", "method"]).n.max()
    return [f"correlations of {task} ({method}): {n} checkpoint pair(s), fewer than {MIN_POINTS}; left empty"
            for (task, method), n in short.items()]
