"""The sweep's plan: every checkpoint pair × method (× parameter combination), each with all its α.

An item of method `none` merges nothing: it scores one checkpoint as it is (`vlmerge study` plans
one for its agnostic baseline).

The expert methods (`experts_interpolation`, `experts_arithmetic`, `experts_regmean`: Sung et al.'s
merges of a modality-expert model into one agnostic model) plan one item per checkpoint of the
`experts` run instead of per pair: the checkpoint is both `text` and `mm`, `base` is W_seed, and α
(the vision expert's weight) runs over the grid for the methods that have one.

A work item is identified by a hash of everything that determines its result (the two
checkpoints, the base, the method and its parameters, the α grid, the tasks and how they are
scored), so that a rerun recognises finished work and a changed config never reuses stale rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmerge.config import EXPERT_RUN, Config
from vlmerge.errors import VlmergeError
from vlmerge.io import fingerprint
from vlmerge.merge.experts import is_expert_method
from vlmerge.merge.methods import get_method
from vlmerge.merge.schedule import SCHEDULE, check_schedule
from vlmerge.layout import checkpoint_words, list_checkpoints


@dataclasses.dataclass(frozen=True)
class WorkItem:
    text: str  # checkpoint directories, relative to the output root
    mm: str
    method: str
    params: str  # JSON, sorted keys
    alphas: tuple[float, ...]
    base: str | None
    salt: str  # what else decides the scores: tasks, their data, the scoring settings
    study: str = ""  # the study key of the item's models (`vlmerge study`), recorded in their rows
    statistics: str = ""  # the settings of the data statistics the method merges with (`item_statistics`)

    @property
    def item_id(self) -> str:
        return fingerprint(identity(self))[:12]

    def describe(self) -> dict[str, Any]:
        return {"item_id": self.item_id, **dataclasses.asdict(self), "params": json.loads(self.params)}


LATER_FIELDS = ("study", "statistics")  # fields added after the first items were named


def identity(item: Any) -> dict[str, Any]:
    """The fields that name a work item: all of them, less the later fields left empty (so that the
    items that do not use them keep the ids they had before, and their finished work stays found)."""
    return {k: v for k, v in dataclasses.asdict(item).items() if not (k in LATER_FIELDS and v == "")}


def array_layout(n_items: int, max_size: int) -> tuple[int, int]:
    """(array tasks, items per task): one item per task when the array fits (indices 0..max−1),
    else as few items per task as make it fit."""
    per_task = max(1, math.ceil(n_items / max_size))
    return math.ceil(n_items / per_task), per_task


def worker_share(items: list[WorkItem], worker: int, workers: int) -> list[WorkItem]:
    """Worker `worker`'s items of `workers`: the items of a checkpoint pair stay together (they share
    its endpoints and distances); pairs go, in plan order, to the worker with the fewest merges."""
    pairs: dict[tuple[str, str], list[WorkItem]] = {}
    for it in items:
        pairs.setdefault((it.text, it.mm), []).append(it)
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for group in pairs.values():
        k = loads.index(min(loads))
        shares[k] += group
        loads[k] += sum(max(len(it.alphas), 1) for it in group)
    return shares[worker]


def method_grid(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """(method, parameters) for every method of the sweep and every combination of its grid."""
    out = []
    for spec in cfg.sweep.methods:
        if "alpha" in spec.params or "alpha" in spec.grid:
            raise VlmergeError(f"sweep.methods: {spec.name}: α comes from sweep.alphas, not from params or grid")
        method = get_method(spec.name)
        keys = list(spec.grid)
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            params = {**spec.params, **dict(zip(keys, combo))}
            try:  # every combination: a grid's value out of range is refused now, before any work
                method.params({k: v for k, v in params.items() if k != SCHEDULE})
            except VlmergeError as e:
                raise VlmergeError(f"sweep.methods: {e}") from None
            if SCHEDULE in params:  # α per tensor (vlmerge.merge.schedule), for the twins' methods
                if method.merges_experts:
                    raise VlmergeError(f"sweep.methods: {spec.name}: a schedule is for the twins' methods")
                check_schedule(params[SCHEDULE], cfg.sweep.allow_extrapolation)
            out.append((spec.name, params))
    return out


def sweep_runs(cfg: Config) -> list[str]:
    """The runs whose checkpoints the sweep merges: the twins, the expert run, or both."""
    experts = [is_expert_method(m) for m, _ in method_grid(cfg)]
    return (["text", "multimodal"] if not all(experts) else []) + ([EXPERT_RUN] if any(experts) else [])


# A run's checkpoints, step 0 included, by run name: what is on disk (None), or a projection of what
# training will write (`vlmerge sweep plan --estimate` before the runs are trained).
Checkpoints = Mapping[str, list[Path]] | None


def all_checkpoints(cfg: Config, run: str, runs: Checkpoints = None) -> list[Path]:
    return list(runs[run]) if runs is not None and run in runs else list_checkpoints(cfg.layout.run_dir(run))


def expert_seed(cfg: Config, runs: Checkpoints = None) -> Path:
    """W_seed of the expert run: the seed run's last checkpoint, or without seed pre-training the
    experts' shared initialisation (the expert run's step 0)."""
    run = "seed" if cfg.runs.seed_pretraining else EXPERT_RUN
    ckpts = all_checkpoints(cfg, run, runs)
    if not ckpts:
        raise VlmergeError(f"{cfg.layout.run_dir(run)}: no checkpoints; train the {run} run first")
    return ckpts[-1] if cfg.runs.seed_pretraining else ckpts[0]


def method_alphas(cfg: Config, method: str) -> tuple[float, ...]:
    """An item's α: the grid, or none for a method without α (merged once)."""
    return tuple(cfg.sweep.alphas) if get_method(method).takes_alpha else ()


def item_statistics(cfg: Config, method: str) -> str:
    """A work item's `statistics`: for a method that merges with data statistics, the settings that decide
    each (a changed sweep.statistics_batches makes new items, never stale scores); empty otherwise."""
    names = get_method(method).statistics
    if not names:
        return ""
    from vlmerge.merge.statistics import settings  # (its imports: data loading)

    return json.dumps({name: settings(cfg) for name in names}, sort_keys=True)


def eval_salt(cfg: Config, tasks: list[str], data: Mapping[str, str] | None = None) -> str:
    """What decides the scores besides the weights: the tasks' data (eval.tasks, or `data`), how they
    are scored."""
    paths = {**{t: cfg.eval.tasks[t] for t in tasks if t in cfg.eval.tasks}, **(data or {})}
    return fingerprint([{t: cfg.layout.relative(paths[t]) for t in tasks}, cfg.eval.prompt, cfg.eval.dtype,
                        cfg.layout.relative(cfg.eval.features), cfg.features.name])


def probing(cfg: Config) -> bool:
    """Whether the sweep's models get the probe's signals (sweep.probe, or the adaptive search that reads them)."""
    return cfg.sweep.probe or cfg.sweep.search == "adaptive"


def sweep_salt(cfg: Config, tasks: list[str]) -> str:
    """eval_salt, and the probe and the search where they are on: they decide what an item writes."""
    salt = eval_salt(cfg, tasks)
    if not probing(cfg):
        return salt
    s = cfg.sweep
    search = {"search": s.search, "task": s.search_task, "budget": s.search_budget,
              "tolerance": cfg.analysis.tolerance, "multimodal": cfg.analysis.multimodal_tasks}
    dev = [cfg.layout.relative(p) for p in cfg.data.dev_text]
    return fingerprint([salt, {"probe_lines": s.probe_lines, "dev_text": dev},
                        search if s.search == "adaptive" else {}])


BEST_TEXT_RUNS = ("text", "multimodal")  # scored on the best-text data: the text twin picks, both are Fig. 3


def best_text_data(cfg: Config) -> tuple[str, str]:
    """(task, data path) that picks the text checkpoint of pairing best_text."""
    task = cfg.sweep.best_text_task
    data = cfg.sweep.best_text_data or cfg.eval.tasks.get(task)
    if data is None:
        raise VlmergeError(f"sweep.best_text_task {task}: no data to score the text checkpoints on; set "
                           f"eval.tasks.{task} or sweep.best_text_data")
    return task, data


def best_text_salt(cfg: Config) -> str:
    """What the kept best-text scores are of: the task, its data, how it is scored, which runs."""
    task, data = best_text_data(cfg)
    return fingerprint([eval_salt(cfg, [task], {task: data}), BEST_TEXT_RUNS])


def sweep_tasks(cfg: Config) -> list[str]:
    tasks = cfg.sweep.tasks or list(cfg.eval.tasks)
    unknown = [t for t in tasks if t not in cfg.eval.tasks]
    if unknown:
        raise VlmergeError(f"sweep.tasks: {unknown[0]!r} has no data path in eval.tasks")
    if not tasks:
        raise VlmergeError("sweep: no tasks (set eval.tasks)")
    return tasks


def run_checkpoints(cfg: Config, run: str, runs: Checkpoints = None) -> list[Path]:
    """A run's checkpoints after step 0 (step 0 is the shared initialisation, the base)."""
    ckpts = [c for c in all_checkpoints(cfg, run, runs) if checkpoint_words(c) > 0]
    if not ckpts:
        raise VlmergeError(f"{cfg.layout.run_dir(run)}: no checkpoints; train the {run} run first")
    return ckpts


def pairs(cfg: Config, best_text: dict[Path, Path] | None = None, runs: Checkpoints = None) -> list[tuple[Path, Path]]:
    """(text checkpoint, multimodal checkpoint) pairs of the configured pairing strategy."""
    text, mm = run_checkpoints(cfg, "text", runs), run_checkpoints(cfg, "multimodal", runs)
    if cfg.sweep.pairing == "all_pairs":
        return [(t, m) for t in text for m in mm]
    if cfg.sweep.pairing == "same_words":
        by_words = {checkpoint_words(t): t for t in text}
        return [(by_words[checkpoint_words(m)], m) for m in mm if checkpoint_words(m) in by_words]
    if best_text is None:
        raise VlmergeError("pairing best_text needs the text checkpoints' scores (vlmerge sweep plan evaluates them)")
    return [(best_text[m], m) for m in mm]


def plan(cfg: Config, best_text: dict[Path, Path] | None = None, runs: Checkpoints = None) -> list[WorkItem]:
    """Every work item of the sweep, in a stable order (of the checkpoints `runs` projects, if given)."""
    tasks = sweep_tasks(cfg)
    salt = sweep_salt(cfg, tasks)
    grid = method_grid(cfg)
    twins = [(m, p) for m, p in grid if not is_expert_method(m)]
    experts = [(m, p) for m, p in grid if is_expert_method(m)]

    def rel(path: Path) -> str:
        return str(path.relative_to(cfg.root))

    items = []
    if twins:
        base = all_checkpoints(cfg, "text", runs)[:1]
        for text, mm in pairs(cfg, best_text, runs):
            for method, params in twins:
                needs_base = get_method(method).needs_base
                if needs_base and not base:
                    raise VlmergeError(f"method {method} needs the text run's initial (step 0) checkpoint")
                items.append(WorkItem(rel(text), rel(mm), method, json.dumps(params, sort_keys=True),
                                      method_alphas(cfg, method), rel(base[0]) if needs_base else None, salt,
                                      statistics=item_statistics(cfg, method)))
    if experts:
        seed = rel(expert_seed(cfg, runs))
        for ckpt in run_checkpoints(cfg, EXPERT_RUN, runs):
            for method, params in experts:
                items.append(WorkItem(rel(ckpt), rel(ckpt), method, json.dumps(params, sort_keys=True),
                                      method_alphas(cfg, method), seed, salt, statistics=item_statistics(cfg, method)))
    return items
