"""Findings: what the results show, as plain sentences with 95% bootstrap intervals.

Computed at each experiment's last checkpoint pair (the most words seen, twins at equal words
where there are such pairs), from the score frames' paired bootstrap replicates (scores.py), so
that every difference carries the items' sampling noise:

- twin gap: text twin minus multimodal twin, per task;
- chance: each twin's score on a task that has a chance level (scores.CHANCE);
- merge: per merge setting, at its best α (tables.best_alpha) on the first text task, the share
  of the text twin's advantage kept and what each multimodal task loses (its drop);
- best method: per task, the setting with the highest score averaged over the α grid all
  settings share, and its margin over the runner-up;
- α trend: along linear merges, Spearman's ρ between α and each task's score;
- distance: per task, the whole-model distance whose Pearson r with the drop (across checkpoint
  pairs, at the report's α) is highest.

A finding whose interval contains its null value (0, or chance) says so in its sentence: "no
effect" is a finding too. Without replicates (analysis.bootstrap = 0) intervals are NaN and no
effect is claimed.

The report opens with four of them at most, picked by `headlines` (its docstring and
docs/report.md give the rule); the others follow grouped by task (`by_task`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import numpy as np
import pandas as pd

from vlmerge.analysis.stats import percentile_interval, spearman
from vlmerge.analysis.tables import Merges
from vlmerge.results import CHECKPOINT_PAIR, MM_ALPHA

@dataclasses.dataclass(frozen=True)
class Finding:
    """One statement: its sentence, the number it rests on with its 95% interval, and whether the
    interval excludes the null value (`effect`)."""

    kind: str  # twin_gap | chance | merge | best_method | alpha_trend | distance
    task: str
    text: str
    value: float
    low: float
    high: float
    null: float  # the value of "no effect" (0, or the chance level)
    n: int | None = None
    effect: bool = False
    details: dict = dataclasses.field(default_factory=dict)
    headline: int | None = None  # its place (1, 2, …) among the few the report opens with (`headlines`); else None

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def interval(samples: np.ndarray) -> tuple[float, float, float]:
    """Point value (column 0) and the 95% percentile interval of the replicates (columns 1…)."""
    low, high = percentile_interval(samples[1:]) if samples.size > 1 else (math.nan, math.nan)
    return float(samples[0]), low, high


def excludes(low: float, high: float, null: float) -> bool:
    """Whether [low, high] lies wholly on one side of `null` (False without an interval)."""
    return bool(low > null or high < null)


def f3(x: float) -> str:
    return f"{x + 0.0:.3f}"


def ci(low: float, high: float, fmt=f3) -> str:
    return "(no interval)" if math.isnan(low) else f"[{fmt(low)}, {fmt(high)}]"


def unsure(low: float, what: str) -> str:
    """Why no effect is claimed: the interval contains the null value, or there is no interval."""
    return f"an interval that contains {what}" if not math.isnan(low) else "no interval (no per-item scores) to tell"


def gap_sentence(value: float, low: float, high: float, *, none: str, above: str, below: str) -> str:
    """A difference in words: `none = value [interval], why` where the interval contains 0, else
    `above` (or `below`) `by` its size and interval, turned positive."""
    if not excludes(low, high, 0.0):
        return f"{none} = {f3(value)} {ci(low, high)}, {unsure(low, '0')}."
    if value > 0:
        return f"{above} by {f3(value)} {ci(low, high)}."
    return f"{below} by {f3(-value)} {ci(-high, -low)}."


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def setting_name(method: str, params: str) -> str:
    """A merge setting as the report names it: the method, its parameters, its α schedule in words."""
    given = json.loads(params)
    schedule = given.pop("schedule", None)
    name = method if not given else f"{method} {json.dumps(given, sort_keys=True)}"
    return name if schedule is None else f"{name} ({schedule_words(schedule)})"


def schedule_words(schedule) -> str:
    """A merge's α schedule (mergekit's syntax, vlmerge.merge.schedule) in words:
    `[{filter: multi_modal_projector, value: 0}]` → "multi_modal_projector at 0, the rest at α"."""
    def value(v) -> str:
        if isinstance(v, list):
            return "→".join(value(x) for x in v) + " over the layers"
        return "α" if v == "alpha" else f"{v:g}"

    bare = not isinstance(schedule, list) or all(not isinstance(c, dict) for c in schedule)
    conditions = [{"value": schedule}] if bare else schedule
    words = [f"{'every tensor' if c.get('filter') in (None, '*') else c['filter']}"
             f"{' ' if isinstance(c['value'], list) else ' at '}{value(c['value'])}" for c in conditions]
    if all(c.get("filter") not in (None, "*") for c in conditions):
        words.append("the rest at α")
    return ", ".join(words)


def last_pair(keys: pd.DataFrame) -> pd.Series:
    """Per row of `keys`: whether it belongs to its experiment's last checkpoint pair."""
    same = keys[keys.text_words == keys.mm_words]
    pool = same if len(same) else keys
    last = pool.sort_values(["mm_words", "text_words"]).drop_duplicates("experiment", keep="last")[CHECKPOINT_PAIR]
    return pd.MultiIndex.from_frame(keys[CHECKPOINT_PAIR]).isin(pd.MultiIndex.from_frame(last))


def at_last_pair(m: Merges) -> Iterator[tuple[str, int, np.ndarray]]:
    """(experiment, words seen, row indices into m) of each experiment's last checkpoint pair."""
    rows = m.keys[last_pair(m.keys)]
    for experiment, part in rows.groupby("experiment", sort=True):
        yield experiment, int(part.mm_words.iloc[0]), part.index.to_numpy()


def twin_gap(m: Merges) -> Iterator[Finding]:
    """Text twin minus multimodal twin (oriented: positive = the text twin is better)."""
    for experiment, words, rows in at_last_pair(m):
        value, low, high = interval(m.task.sign * (m.text[rows[0]] - m.mm[rows[0]]))
        if math.isnan(value):
            continue
        effect = excludes(low, high, 0.0)
        at = f"At {words:,} words the"
        text = gap_sentence(value, low, high, none=f"{at} twins do not differ on {m.task.label}: text − multimodal",
                            above=f"{at} text twin is ahead on {m.task.label}",
                            below=f"{at} multimodal twin is ahead on {m.task.label}")
        yield Finding("twin_gap", m.task.task, text, value, low, high, 0.0, None, effect,
                      {"experiment": experiment, "words": words})


def above_chance(m: Merges) -> Iterator[Finding]:
    """Each twin's score against the task's chance level."""
    level = m.task.chance
    if level is None:
        return
    for experiment, words, rows in at_last_pair(m):
        for twin, scores in (("multimodal", m.mm), ("text", m.text)):
            value, low, high = interval(scores[rows[0]])
            if math.isnan(value):
                continue
            effect = excludes(low, high, level)
            verdict = (f"{'above' if value > level else 'below'} chance ({level:.3g}) by {f3(abs(value - level))}"
                       if effect else f"{unsure(low, f'chance ({level:.3g})')}: no better than guessing")
            yield Finding("chance", m.task.task,
                          f"At {words:,} words the {twin} twin scores {f3(value)} {ci(low, high)} on "
                          f"{m.task.label}, {verdict}.", value, low, high, level, None, effect,
                          {"experiment": experiment, "words": words, "twin": twin})


def merge_effects(all_merges: list[Merges], best: pd.DataFrame) -> Iterator[Finding]:
    """Per setting at the last pair: the best α's retention of the first text task's advantage and
    every multimodal task's drop there."""
    text_merges = [m for m in all_merges if m.task.kind == "text"]
    if not text_merges:
        return
    first = text_merges[0]
    mm_merges = [m for m in all_merges if m.task.kind == "multimodal"]
    chosen = best[best.task == first.task.task]
    for experiment, words, rows in at_last_pair(first):
        for (method, params), part in first.keys.loc[rows].groupby(["method", "method_params"], sort=True):
            row = chosen[(chosen.experiment == experiment) & (chosen.method == method)
                         & (chosen.method_params == params) & (chosen.mm_words == words)]
            name = setting_name(method, params)
            if row.empty or pd.isna(row.best_alpha.iloc[0]):
                yield Finding("merge", first.task.task, f"At {words:,} words no α of {name} keeps every multimodal "
                              "drop within the tolerance.", math.nan, math.nan, math.nan, 0.0, None, False,
                              {"experiment": experiment, "words": words, "method": method, "method_params": params})
                continue
            alpha = float(row.best_alpha.iloc[0])
            details = {"experiment": experiment, "words": words, "method": method, "method_params": params}
            if alpha == MM_ALPHA:  # no weight on the text twin: nothing of it is kept, so say that plainly
                yield Finding("merge", first.task.task, f"At {words:,} words only α = 0 of {name}, no weight on the "
                              "text twin, keeps every multimodal drop within the tolerance: no merge keeps any of "
                              f"the text twin's advantage on {first.task.label} without losing image abilities.", 0.0, math.nan,
                              math.nan, 0.0, None, False, {**details, "alpha": alpha})
                continue
            i = part.index[part.alpha == alpha][0]
            gap = interval(first.task.sign * (first.text[i] - first.mm[i]))
            keep = interval(first.retention[i])
            if excludes(gap[1], gap[2], 0.0) and gap[0] > 0:
                clause = f"keeps {pct(keep[0])} {ci(keep[1], keep[2], pct)} of the text twin's advantage on {first.task.label}"
            else:
                clause = f"has no text-twin advantage on {first.task.label} to keep"
            losses = []
            for mm in mm_merges:
                j = _same_model(mm.keys, first.keys.loc[i])
                if j is not None:
                    d = interval(mm.drop[j])
                    losses.append((mm.task.task, d, f"{f3(d[0])} {ci(d[1], d[2])} of {mm.task.label}"))
            lost = f" and loses {', '.join(s for *_, s in losses)}" if losses else ""
            yield Finding("merge", first.task.task, f"At {words:,} words {name} at α = {alpha:g} {clause}{lost}.",
                          *keep, 0.0, None, excludes(keep[1], keep[2], 0.0),
                          {**details, "alpha": alpha, "drops": {t: list(d) for t, d, _ in losses}})


def _same_model(keys: pd.DataFrame, row: pd.Series) -> int | None:
    """The index of `row`'s model (PAIR + alpha) in `keys`, or None."""
    match = keys.index[(keys[[*CHECKPOINT_PAIR, "method", "method_params", "alpha"]]
                        == row[[*CHECKPOINT_PAIR, "method", "method_params", "alpha"]]).all(axis=1)]
    return int(match[0]) if len(match) else None


def best_method(m: Merges) -> Iterator[Finding]:
    """The setting with the highest score averaged over the shared α grid, and its margin over the runner-up."""
    for experiment, words, rows in at_last_pair(m):
        keys = m.keys.loc[rows]
        settings = keys.groupby(["method", "method_params"], sort=True)
        if settings.ngroups < 2:
            continue
        alphas = sorted(set.intersection(*(set(p.alpha) for _, p in settings)))
        means = {name: m.task.sign * m.score[p.index[p.alpha.isin(alphas)]].mean(axis=0) for name, p in settings}
        ranked = sorted(means, key=lambda k: -means[k][0])
        top, runner = ranked[0], ranked[1]
        value, low, high = interval(means[top] - means[runner])
        effect = excludes(low, high, 0.0)
        verdict = "" if effect else f"; {unsure(low, '0')}: no clear winner"
        grid = ", ".join(f"{a:g}" for a in alphas)
        yield Finding("best_method", m.task.task,
                      f"At {words:,} words, averaged over α ∈ {{{grid}}}, {setting_name(*top)} is best on "
                      f"{m.task.label} ({f3(m.task.sign * means[top][0])}), ahead of {setting_name(*runner)} "
                      f"({f3(m.task.sign * means[runner][0])}) by {f3(value)} {ci(low, high)}{verdict}.",
                      value, low, high, 0.0, len(alphas), effect,
                      {"experiment": experiment, "words": words, "best": list(top), "runner_up": list(runner)})


def alpha_trend(m: Merges, method: str = "linear") -> Iterator[Finding]:
    """Spearman's ρ between α and the score along one method's merges of the last pair."""
    for experiment, words, rows in at_last_pair(m):
        keys = m.keys.loc[rows]
        for params, part in keys[keys.method == method].groupby("method_params", sort=True):
            if part.alpha.nunique() < 3:
                continue
            rho = spearman(part.alpha.to_numpy(), (m.task.sign * m.score[part.index]).T)
            value, low, high = interval(rho)
            if math.isnan(value):
                continue
            effect = excludes(low, high, 0.0)
            trend = (("rises with α" if value > 0 else "falls with α") if effect else
                 f"shows no monotone trend in α ({unsure(low, '0')})")
            yield Finding("alpha_trend", m.task.task,
                          f"Along {setting_name(method, params)} merges at {words:,} words, {m.task.label} {trend} "
                          f"(Spearman ρ = {f3(value)} {ci(low, high)}, {part.alpha.nunique()} α).",
                          value, low, high, 0.0, int(part.alpha.nunique()), effect,
                          {"experiment": experiment, "words": words, "method": method, "method_params": params})


def best_distance(correlations: pd.DataFrame, task: str, label: str, alpha: float) -> Iterator[Finding]:
    """The whole-model distance with the highest Pearson r against the drop at `alpha` (linear first)."""
    rows = correlations[(correlations.task == task) & (correlations.scope == "model")
                        & (correlations.alpha == alpha)].dropna(subset=["pearson"])
    if rows.empty:
        return
    linear = rows[rows.method == "linear"]
    rows = linear if len(linear) else rows
    top = rows.sort_values("pearson", ascending=False).iloc[0]
    value, low, high, n = float(top.pearson), float(top.ci_low), float(top.ci_high), int(top.n)
    effect = excludes(low, high, 0.0)
    name = f"{top.metric.upper()} ({top.space})"
    setting = setting_name(top.method, top.method_params)
    text = (f"At α = {alpha:g} ({setting}), {name} predicts the drop in {label} best: r = {f3(value)} "
            f"{ci(low, high)} over {n} checkpoint pairs." if effect else
            f"At α = {alpha:g} ({setting}) no distance predicts the drop in {label}: the best, {name}, has "
            f"r = {f3(value)} {ci(low, high)} over {n} checkpoint pairs, {unsure(low, '0')}.")
    yield Finding("distance", task, text, value, low, high, 0.0, n, effect,
                  {"metric": top.metric, "space": top.space, "method": top.method, "alpha": alpha})


def findings(all_merges: list[Merges], best: pd.DataFrame, correlations: pd.DataFrame, alpha: float) -> list[Finding]:
    """Every finding, in the report's order."""
    out: list[Finding] = []
    out += [f for m in all_merges for f in twin_gap(m)]
    out += [f for m in all_merges if m.task.kind == "multimodal" for f in above_chance(m)]
    out += list(merge_effects(all_merges, best))
    out += [f for m in all_merges for f in best_method(m)]
    out += [f for m in all_merges for f in alpha_trend(m)]
    out += [f for m in all_merges for f in best_distance(correlations, m.task.task, m.task.label, alpha)]
    return out


def headlines(items: list[Finding]) -> list[Finding]:
    """The findings the report opens with, in this order, each where there is one (four at most):

    1. the twins' trade-off: the largest text-twin lead and the largest multimodal-twin lead among
       the twin gaps whose interval excludes 0 (in the task's own units);
    2. the best merge by the analysis rule: of the merge findings (each setting at its best α: the
       highest text-task score whose multimodal drops stay within the tolerance), the one that keeps
       the largest share of the text twin's advantage; its sentence says what it keeps and loses.
       Where no setting has such an α, the first setting's finding, which says so;
    3. the best predictor of the drop: of the distance findings (per task, the distance with the
       highest Pearson r), the one with the highest r among those whose interval excludes 0, else
       the highest r of all, whose sentence says that no distance predicts the drop.
    """
    gaps = [f for f in items if f.kind == "twin_gap" and f.effect]
    text_lead = max((f for f in gaps if f.value > 0), key=lambda f: f.value, default=None)
    mm_lead = min((f for f in gaps if f.value < 0), key=lambda f: f.value, default=None)
    merge = max((f for f in items if f.kind == "merge"), default=None,
                key=lambda f: (not math.isnan(f.value), -math.inf if math.isnan(f.value) else f.value))
    predictor = max((f for f in items if f.kind == "distance"), key=lambda f: (f.effect, f.value), default=None)
    return [f for f in (text_lead, mm_lead, merge, predictor) if f is not None]


def with_headlines(items: list[Finding]) -> list[Finding]:
    """Every finding in its order, those of `headlines` with their place there (`headline`)."""
    place = {id(f): k for k, f in enumerate(headlines(items), 1)}
    return [dataclasses.replace(f, headline=place.get(id(f))) for f in items]


def headline_of(items: list[Finding]) -> list[Finding]:
    """The findings marked by `with_headlines`, in their place."""
    return sorted((f for f in items if f.headline), key=lambda f: f.headline)


def by_task(items: list[Finding]) -> list[tuple[str, list[Finding]]]:
    """The findings but the headline ones, grouped by task (tasks in the order of their first finding)."""
    groups: dict[str, list[Finding]] = {}
    for f in items:
        groups.setdefault(f.task, [])
        if not f.headline:
            groups[f.task].append(f)
    return [(task, group) for task, group in groups.items() if group]


def to_markdown(items: list[Finding]) -> str:
    """The headline findings, then the others under a heading per task."""
    if not items:
        return "# Findings\n\nNo findings: no merged models.\n"
    out = ["# Findings", ""]
    if top := headline_of(items):
        out += ["## Headline", "", *(f"- {f.text}" for f in top), ""]
    for task, group in by_task(items):
        out += [f"## {task}", "", *(f"- {f.text}" for f in group), ""]
    return "\n".join(out)


def to_json(items: list[Finding]) -> str:
    return json.dumps([f.to_json() for f in items], indent=1, ensure_ascii=False) + "\n"
