"""The mergeability probe against the full evaluation, wherever both exist.

A sweep run with the probe (`sweep.probe`, or `sweep.search: adaptive`) has the probe's signals of
every twin and merge (task `probe`). Here the predictor (`vlmerge.predict`) is fitted on the twins,
as the adaptive search fits it, and compared with the merges scored in full:

- per target task, the predicted drop of each merge (against the better twin of its pair) beside
  the measured one: Spearman's ρ across (pair, α);
- per merge setting of a pair whose grid is evaluated in full, the α the probe predicts best (the
  search's first choice, under analysis.tolerance) beside the grid's best α, by the analysis's rule.
"""

from __future__ import annotations

import math

import pandas as pd

from vlmerge.analysis.findings import Finding
from vlmerge.analysis.load import MODEL, PAIR
from vlmerge.analysis.stats import spearman
from vlmerge.analysis.tables import twin_keys
from vlmerge.config import AnalysisConfig
from vlmerge.errors import VlmergeError
from vlmerge.predict import PROBE, Predictor, Target, best_alpha, first_alphas, multimodal_targets
from vlmerge.results import UNMERGED

DROP_COLUMNS = [*PAIR, "alpha", "task", "predicted_drop", "measured_drop"]
CHOICE_COLUMNS = [*PAIR, "task", "grid_best", "probe_best", "steps_apart", "alphas"]


def probe_tables(metrics: pd.DataFrame, options: AnalysisConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(drops: predicted beside measured per merge and target; choices: the probe's best α beside the grid's)."""
    empty = pd.DataFrame(columns=DROP_COLUMNS), pd.DataFrame(columns=CHOICE_COLUMNS)
    if not (metrics.task == PROBE).any():
        return empty
    rows = {key: part.to_dict("records") for key, part in metrics.groupby(MODEL, sort=True)}
    probed = {k: r for k, r in rows.items() if any(x["task"] == PROBE for x in r)}
    twins = [r for k, r in probed.items() if k[1] == UNMERGED]
    present = set(metrics.task)
    text = sorted(k for k in options.text_tasks if k.partition("/")[0] in present)
    if not text or len(twins) < 4:
        return empty
    target = Target(text[0], options.text_tasks[text[0]])
    try:
        predictor = Predictor.fitted(target, multimodal_targets(options.multimodal_tasks), twins)
    except VlmergeError:  # too few twins scored on the text task to fit a line: nothing to compare
        return empty
    merged = pd.DataFrame([k for k in probed if k[1] != UNMERGED], columns=MODEL)
    if merged.empty:
        return empty
    text_twins, mm_twins = (twin_keys(merged, run) for run in ("text", "mm"))
    drops, outcomes = [], {}
    for i, key in enumerate(merged.itertuples(index=False, name=None)):
        pair = (rows.get(tuple(text_twins[i]), []), rows.get(tuple(mm_twins[i]), []))
        if not pair[0] or not pair[1]:
            continue
        own = rows[key]
        predicted = predictor.predicted(own, pair)
        scored = any(r["task"] != PROBE for r in own)
        outcomes[key] = (predicted, predictor.measured(own, pair) if scored else None)
        if scored:
            drops += [[*key, task, *both] for task, both in predictor.drops(own, pair).items()]
    choices = []
    frame = pd.DataFrame([[*k] for k in outcomes], columns=MODEL)
    for pair_key, part in frame.groupby(PAIR, sort=True):
        keys = [tuple(r) for r in part.itertuples(index=False, name=None)]
        grid = sorted(k[-1] for k in keys)
        if any(outcomes[k][1] is None for k in keys) or len(grid) < 3:
            continue  # not evaluated in full at every α: no grid to compare with
        by_alpha = {k[-1]: outcomes[k] for k in keys}
        grid_best = best_alpha({a: o[1] for a, o in by_alpha.items()}, options.tolerance)
        probe_best = first_alphas(grid, {a: o[0] for a, o in by_alpha.items()}, options.tolerance)[0]
        if grid_best is None:  # no α within tolerance: the probe agrees when it predicts none either
            steps = 0 if best_alpha({a: o[0] for a, o in by_alpha.items()}, options.tolerance) is None else math.nan
        else:
            steps = abs(grid.index(probe_best) - grid.index(grid_best))
        choices.append([*pair_key, target.key, grid_best, probe_best, steps, len(grid)])
    return pd.DataFrame(drops, columns=DROP_COLUMNS), pd.DataFrame(choices, columns=CHOICE_COLUMNS)


def rank_agreement(drops: pd.DataFrame) -> pd.DataFrame:
    """Per target task: Spearman's ρ between predicted and measured drops across (pair, α), and n."""
    out = [(task, float(spearman(part.predicted_drop.to_numpy(), part.measured_drop.to_numpy())), len(part))
           for task, part in drops.groupby("task", sort=True) if len(part) >= 3]
    return pd.DataFrame(out, columns=["task", "spearman", "n"])


def probe_findings(drops: pd.DataFrame, choices: pd.DataFrame, tolerance: float) -> list[Finding]:
    """How well the probe ranks the drops, and how often its best α is the grid's (within one step)."""
    out = []
    ranks = rank_agreement(drops).dropna()
    if len(ranks):
        lead = ranks.task == (choices.task.iloc[0] if len(choices) else ranks.task.iloc[0])  # the search task
        first = ranks[lead].iloc[0] if lead.any() else ranks.iloc[0]
        each = ", ".join(f"{rho:.3f} ({task})" for task, rho, _ in ranks.itertuples(index=False))
        out.append(Finding("probe", str(first.task), f"The mergeability probe (a line from the held-out LM loss to a "
                           f"text task's score, from the caption loss to a multimodal task's, fitted on the twins) "
                           f"ranks the drops of {int(first.n)} merges as the full evaluation measures them: Spearman "
                           f"ρ = {each}.", float(first.spearman), math.nan, math.nan, 0.0, int(first.n),
                           details={row.task: row.spearman for row in ranks.itertuples(index=False)}))
    found = choices
    if len(found):
        near = int((found.steps_apart <= 1).sum())  # NaN: one of the two finds no α within tolerance
        task = str(found.task.iloc[0])
        out.append(Finding("probe_choice", task, f"The probe's predicted best α (the adaptive search's first choice, "
                           f"multimodal tolerance {tolerance:g}) is within one grid step of the full grid's best α for "
                           f"{task} on {near} of {len(found)} merge settings and checkpoint pairs "
                           f"({int((found.steps_apart == 0).sum())} exactly).", near / len(found), math.nan, math.nan,
                           0.0, len(found)))
    return out
