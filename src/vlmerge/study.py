"""`vlmerge study`: Sung et al. (2023) on one world, a planner of training runs and of sweep work items.

Runs. For every expert setting (variant, K_seed) of `study` — the `all` variant at every K_seed,
every variant at `variant_seed_epochs` — an experiment of its own (`<exp>-<variant>-seed<K>`,
sharing the base experiment's tokenizer and corpus) trains the agnostic seed run for K_seed epochs
and the expert run for the rest of the budget. The agnostic model trained from scratch for the
whole budget (MAA) is the experiment `<exp>-maa`.

Items. The study's models are scored and fine-tuned by the sweep's own work items, runner and done
protocol (`vlmerge.sweep`), in units: unit 0 is MAA (one item of method `none`: scored as it is),
unit k ≥ 1 is expert setting k − 1 (its last checkpoint merged by every method of the grid —
interpolation at every α, modality arithmetic at every λ, RegMean at every α × γ — each merge
scored, the unmerged expert model (MSA) scored as the items' endpoint, the distances between its
experts). Then each of a unit's models is fine-tuned on every task of `study.finetune` (the sweep's
fine-tuning items: Sung et al.'s protocol, pre-train, merge, fine-tune). Every row carries its
model's study key (`vlmerge.modelkey.study_key`: variant, K_seed), which `vlmerge.analysis.sung`
reads; no name is parsed. All results go to the base experiment's results folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from vlmerge import launch
from vlmerge.config import EXPERT_RUN, Config, merge_dicts
from vlmerge.errors import VlmergeError
from vlmerge.io import link_inside
from vlmerge.layout import maa_experiment, study_experiment
from vlmerge.modelkey import EXPERT_METHOD_PREFIX, MAA_VARIANT, MM_ALPHA, UNMERGED, study_key

if TYPE_CHECKING:
    from vlmerge.sweep.finetune import FinetuneItem
    from vlmerge.sweep.plan import WorkItem

FINETUNE_OWNER = "study.finetune"  # the setting that names the study's fine-tuning tasks (in errors, reports)
Setting = tuple[str, int]  # (variant, K_seed) of an expert run
Unit = Setting | None  # the models of one expert setting, or (None) MAA


def expert_settings(cfg: Config) -> list[Setting]:
    """(variant, K_seed) of every expert run: `all` across the K_seed grid, each variant at one K_seed."""
    s = cfg.study
    settings = [("all", k) for k in s.seed_epochs] + [(v, s.variant_seed_epochs) for v in s.variants]
    return list(dict.fromkeys(settings))


def units(cfg: Config) -> list[Unit]:
    """The study's units of work items: MAA, then every expert setting."""
    return [None, *expert_settings(cfg)]


def sub_config(cfg: Config, experiment: str, changes: dict) -> Config:
    """The base config with another experiment name and `changes` (nested sections)."""
    return Config.model_validate(merge_dicts(cfg.model_dump(mode="json"), {"experiment": experiment, **changes}))


def expert_config(cfg: Config, variant: str, k: int) -> Config:
    s = cfg.study
    return sub_config(cfg, study_experiment(cfg.experiment, variant, k), {
        "model": {"experts": variant, "cross_modal_layers": s.cross_modal_layers},
        "runs": {"seed_pretraining": k > 0, "seed": {"epochs": max(k, 1)},
                 "experts": {"epochs": s.total_epochs - k}},
    })


def maa_config(cfg: Config) -> Config:
    return sub_config(cfg, maa_experiment(cfg.experiment), {
        "runs": {"seed_pretraining": False, "multimodal": {"epochs": cfg.study.total_epochs}}})


def items_config(cfg: Config) -> Config:
    """The config the study's work items run under: the base experiment (its results folder), scored on
    study.tasks, with the distances between each setting's experts."""
    tasks = cfg.study.tasks or list(cfg.eval.tasks)
    return cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"tasks": tasks, "distances": True})})


def share_inputs(base: Config, sub: Config) -> None:
    """The sub-experiment reads the base experiment's tokenizer and corpus (links, made once)."""
    for src, dst in ((base.layout.tokenizer_dir, sub.layout.tokenizer_dir), (base.layout.corpus_dir, sub.layout.corpus_dir)):
        if not dst.exists():
            link_inside(src, dst)


def merge_grid(cfg: Config, variant: str, k: int) -> list[tuple[str, dict[str, float], tuple[float, ...]]]:
    """(method, parameters, α grid) of every work item of one expert checkpoint: interpolation at every
    α, and for the `all` variant at the longest seed (Sung et al.'s Table 2) every method's grid too."""
    s = cfg.study
    alphas = tuple(s.alphas)
    grid = [("interpolation", {}, alphas)]
    if (variant, k) == ("all", max(s.seed_epochs)):
        grid += [("arithmetic", {"lam": float(lam)}, ()) for lam in s.lams]
        grid += [("regmean", {"gamma": float(g)}, alphas) for g in s.gammas]
    return [(EXPERT_METHOD_PREFIX + m, p, a) for m, p, a in grid]


def unit_items(cfg: Config, unit: Unit) -> list[WorkItem]:
    """The sweep work items of one unit (its runs trained): MAA scored as it is, or one setting's merges."""
    from vlmerge.sweep.plan import WorkItem, eval_salt, expert_seed, item_statistics, run_checkpoints, sweep_tasks

    run_cfg = items_config(cfg)
    salt = eval_salt(run_cfg, sweep_tasks(run_cfg))

    def rel(path: Path) -> str:
        return str(path.relative_to(cfg.root))

    if unit is None:
        last = rel(run_checkpoints(maa_config(cfg), "multimodal")[-1])
        return [WorkItem(last, last, UNMERGED, "{}", (), None, salt, study_key(MAA_VARIANT))]
    sub = expert_config(cfg, *unit)
    last, seed = rel(run_checkpoints(sub, EXPERT_RUN)[-1]), rel(expert_seed(sub))
    return [WorkItem(last, last, method, json.dumps(params, sort_keys=True), alphas, seed, salt, study_key(*unit),
                     item_statistics(cfg, method)) for method, params, alphas in merge_grid(cfg, *unit)]


def unit_finetune_items(cfg: Config, unit: Unit, task: str) -> list[FinetuneItem]:
    """The fine-tuning items of one unit on `task`: MAA, or MSA and every merge of the setting."""
    from vlmerge.sweep.finetune import FinetuneItem, finetune_salt

    salt = finetune_salt(cfg, task)
    models: dict[str, FinetuneItem] = {}
    for it in unit_items(cfg, unit):
        unmerged = FinetuneItem(None, it.mm, UNMERGED, "{}", MM_ALPHA, None, task, salt, it.study)  # MAA or MSA
        merges = [] if it.method == UNMERGED else [
            FinetuneItem(it.text, it.mm, it.method, it.params, a, it.base, task, salt, it.study) for a in it.alphas or (None,)]
        models.update((m.item_id, m) for m in [unmerged, *merges])
    return list(models.values())


def check_finetune_tasks(cfg: Config) -> None:
    """Every task of study.finetune has data and at least one training batch (before any training)."""
    from vlmerge.finetune.run import read_config_task, recipe
    from vlmerge.finetune.tasks import get_task

    for name in cfg.study.finetune:
        train = read_config_task(cfg, name, FINETUNE_OWNER)["train"]
        batch = recipe(cfg.finetune, get_task(name)).batch_size
        if len(train) < batch:
            raise VlmergeError(f"study.finetune: {name} has {len(train)} training examples, fewer than one batch of {batch}")


def train_seed(base: Config, sub: Config, k: int, progress: bool) -> None:
    """The agnostic seed run of K_seed epochs, trained once (in the `all` experiment) and linked
    into the other variants' experiments: it does not depend on the variant."""
    from vlmerge.train.loop import finished, train

    canonical = expert_config(base, "all", k)
    # The training array trained it; the settings of this K_seed (array tasks on several nodes at once)
    # only check, without the run's lock, which one of them would hold while the others were refused.
    if not finished(canonical, "seed"):
        train(canonical, "seed", progress=progress, job=launch.slurm_job())
    here, there = sub.layout.run_dir("seed"), canonical.layout.run_dir("seed")
    if here != there and not here.exists():
        link_inside(there, here)


# The study in parts, for Slurm (jobs/study.sh): data → training array (MAA and each seed run) →
# settings array (one expert run each) → items array (one unit each) → fine-tuning array (one unit ×
# one task each) → report. `run_study` runs them all in this process.
PARTS = ("data", "train", "settings", "items", "finetune", "report")


def training_tasks(cfg: Config) -> list[int | None]:
    """The training array's tasks: MAA (None), then every seed run (K_seed > 0) the settings share."""
    return [None, *sorted({k for _, k in expert_settings(cfg) if k > 0})]


def prepare_study(cfg: Config, *, progress: bool = False) -> None:
    """The world's data stages, the fine-tuning tasks' check, and every sub-experiment's links to the
    tokenizer and corpus (made here, once, so that array tasks never race to make them)."""
    from vlmerge.finetune.run import task_folder
    from vlmerge.pipeline import run_data_stages

    for name in cfg.study.finetune:  # a task without data fails before the data stages
        task_folder(cfg, name, FINETUNE_OWNER)
    run_data_stages(cfg, progress=progress)
    check_finetune_tasks(cfg)
    seeds = [("all", k) for k in training_tasks(cfg)[1:]]  # where each seed run is trained
    for sub in [maa_config(cfg), *(expert_config(cfg, v, k) for v, k in dict.fromkeys(expert_settings(cfg) + seeds))]:
        share_inputs(cfg, sub)


def run_training_task(cfg: Config, index: int, *, progress: bool = False) -> None:
    """Task `index` of `training_tasks`: MAA trained, or one seed run."""
    from vlmerge.train.loop import train

    k = training_tasks(cfg)[index]
    if k is None:
        train(maa_config(cfg), "multimodal", progress=progress, job=launch.slurm_job())
    else:
        train_seed(cfg, expert_config(cfg, "all", k), k, progress)


def run_setting_task(cfg: Config, index: int, *, progress: bool = False) -> None:
    """Setting `index` of `expert_settings`: its seed run (linked) and its expert run."""
    from vlmerge.train.loop import train

    variant, k = expert_settings(cfg)[index]
    print(f"study: {variant} experts, seed {k} of {cfg.study.total_epochs} epochs")
    sub = expert_config(cfg, variant, k)
    if k:
        train_seed(cfg, sub, k, progress)
    train(sub, EXPERT_RUN, progress=progress, job=launch.slurm_job())


def run_items_task(cfg: Config, index: int, *, progress: bool = False) -> None:
    """Unit `index`'s work items, each unless done (the sweep's runner)."""
    from vlmerge.sweep.run import run_items

    run_items(items_config(cfg), unit_items(cfg, units(cfg)[index]), progress=progress)


def run_finetune_task(cfg: Config, index: int, *, progress: bool = False) -> None:
    """Fine-tuning task `index`: one unit's models on one task of study.finetune, each unless done."""
    from vlmerge.finetune.run import read_config_task
    from vlmerge.sweep.finetune import run_item

    tasks = cfg.study.finetune
    unit, name = units(cfg)[index // len(tasks)], tasks[index % len(tasks)]
    splits = read_config_task(cfg, name, FINETUNE_OWNER)
    for item in unit_finetune_items(cfg, unit, name):
        run_item(cfg, item, splits=splits, progress=progress)


def study_report(cfg: Config) -> Path:
    from vlmerge.analysis.sung import sung_report

    report = sung_report([cfg.layout.results_dir], cfg.layout.report_dir, cfg.analysis)
    print(f"study: report {report}")
    return report


ARRAYS = {"train": run_training_task, "settings": run_setting_task, "items": run_items_task,
          "finetune": run_finetune_task}


def array_sizes(cfg: Config) -> dict[str, int]:
    """The size of each of the study's Slurm arrays (a fine-tuning array of 0 tasks is not submitted)."""
    return {"train": len(training_tasks(cfg)), "settings": len(expert_settings(cfg)), "items": len(units(cfg)),
            "finetune": len(units(cfg)) * len(cfg.study.finetune)}


def run_part(cfg: Config, part: str, index: int | None = None, *, progress: bool = False) -> None:
    """One part of the study; for the arrays, task `index` or (None) every task in turn."""
    if part == "data":
        prepare_study(cfg, progress=progress)
    elif part == "report":
        study_report(cfg)
    else:
        count = array_sizes(cfg)[part]
        if index is not None and not 0 <= index < count:
            raise VlmergeError(f"study --part {part} --index {index}: expected 0..{count - 1}")
        for i in range(count) if index is None else [index]:
            ARRAYS[part](cfg, i, progress=progress)


def run_study(cfg: Config, *, progress: bool = False) -> Path:
    """Every run, merge, evaluation and fine-tuning of the study, then its report; returns the report's path."""
    for part in PARTS[:-1]:
        run_part(cfg, part, progress=progress)
    return study_report(cfg)
