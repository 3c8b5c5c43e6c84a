"""`vlmerge study`: Sung et al. (2023) on one world, in this process, each step skipped once done.

For every expert setting (variant, K_seed) of `study` — the `all` variant at every K_seed, every
variant at `variant_seed_epochs` — an experiment of its own (`<exp>-<variant>-seed<K>`, sharing
the base experiment's tokenizer and corpus) trains the agnostic seed run for K_seed epochs and
the expert run for the rest of the budget, then: the experts' Grams, every merge of the method
grids (interpolation α, modality arithmetic λ, RegMean α × γ) into a plain checkpoint, each
evaluated, the unmerged expert model (MSA) evaluated, and the distances between the experts.
The agnostic model trained from scratch for the whole budget (MAA) is evaluated beside them.
All results go to the base experiment's results folder; `vlmerge.analysis.sung` reports them.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlmerge.config import EXPERT_RUN, Config, merge_dicts
from vlmerge.errors import VlmergeError
from vlmerge.layout import (
    expert_merge_dir, maa_experiment, result_file, study_experiment, study_finetune_name, study_result_name,
)


def expert_settings(cfg: Config) -> list[tuple[str, int]]:
    """(variant, K_seed) of every expert run: `all` across the K_seed grid, each variant at one K_seed."""
    s = cfg.study
    settings = [("all", k) for k in s.seed_epochs] + [(v, s.variant_seed_epochs) for v in s.variants]
    return list(dict.fromkeys(settings))


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


def share_inputs(base: Config, sub: Config) -> None:
    """The sub-experiment reads the base experiment's tokenizer and corpus (links, made once)."""
    for src, dst in ((base.layout.tokenizer_dir, sub.layout.tokenizer_dir), (base.layout.corpus_dir, sub.layout.corpus_dir)):
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)


def merge_grid(cfg: Config, variant: str, k: int) -> list[tuple[str, dict[str, float]]]:
    """(method, parameters) of every merge of one expert checkpoint: interpolation at every α, and
    for the `all` variant at the longest seed (Sung et al.'s Table 2) every method's grid too."""
    s = cfg.study
    grid = [("interpolation", {"alpha": a}) for a in s.alphas]
    if (variant, k) == ("all", max(s.seed_epochs)):
        grid += [("arithmetic", {"lam": lam}) for lam in s.lams]
        grid += [("regmean", {"alpha": a, "gamma": g}) for a in s.alphas for g in s.gammas]
    return grid


def train_seed(base: Config, sub: Config, k: int, progress: bool) -> None:
    """The agnostic seed run of K_seed epochs, trained once (in the `all` experiment) and linked
    into the other variants' experiments: it does not depend on the variant."""
    from vlmerge.train.loop import train

    canonical = expert_config(base, "all", k)
    train(canonical, "seed", progress=progress)
    here, there = sub.layout.run_dir("seed"), canonical.layout.run_dir("seed")
    if here != there and not here.exists():
        here.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(there.resolve(), here)


class Evaluator:
    """The study's tasks, read once, scored for one model after another into the base results folder;
    and its fine-tuning tasks (`study.finetune`), each model fine-tuned on each after its scoring."""

    def __init__(self, cfg: Config):
        from vlmerge.data import FeatureTable
        from vlmerge.evaluate.run import prepare, task_specs
        from vlmerge.finetune.run import recipe
        from vlmerge.finetune.tasks import get_task, read_task
        from vlmerge.problems import ProblemLog

        self.cfg = cfg
        self.features = FeatureTable(cfg.eval_store_path)
        problems = ProblemLog()
        self.tasks = prepare(task_specs(cfg, cfg.study.tasks or list(cfg.eval.tasks)), self.features, problems)
        missing = [t for t in cfg.study.finetune if t not in cfg.finetune.tasks]
        if missing:
            raise VlmergeError(f"study.finetune: {missing[0]!r} has no folder in finetune.tasks")
        self.finetune = [(get_task(t), read_task(get_task(t), Path(cfg.finetune.tasks[t]), problems, cfg.finetune))
                         for t in cfg.study.finetune]
        problems.report("study eval")
        for task, splits in self.finetune:  # before any training, not after it
            batch = recipe(cfg.finetune, task).batch_size
            if len(splits["train"]) < batch:
                raise VlmergeError(f"study.finetune: {task.name} has {len(splits['train'])} training examples, fewer "
                                   f"than one batch of {batch}")

    def done(self, name: str) -> bool:
        return result_file(self.cfg.layout.results_dir, "metrics", name).is_file()

    def __call__(self, model_dir: Path, name: str) -> None:
        """Score the model in `model_dir` (plain, merged or expert), then fine-tune it on each task of
        study.finetune, each unless its results exist."""
        from vlmerge.device import resolve_device
        from vlmerge.evaluate.run import config_scorer, evaluate, load_model, result_rows
        from vlmerge.finetune.run import finetune_model, outcome_rows
        from vlmerge.results import ModelKey

        key, device = ModelKey.of_directory(model_dir), resolve_device(self.cfg.compute.device)
        if not self.done(name):
            model, tokenizer = load_model(model_dir, device)
            results = evaluate(config_scorer(self.cfg, model, tokenizer, self.features), self.tasks)
            self._write(name, *result_rows(key, results, config_hash=self.cfg.hash()))
        for task, splits in self.finetune:
            tuned = study_finetune_name(name, task.name)
            if not self.done(tuned):
                model, tokenizer = load_model(model_dir, device)  # fresh weights for every task
                outcome = finetune_model(self.cfg, model, tokenizer, task, splits)
                self._write(tuned, *outcome_rows(key, task, outcome, config_hash=self.cfg.hash()))
                print(f"study: {tuned}: " + ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items()))

    def _write(self, name: str, rows: list[dict], items: list[dict]) -> None:
        from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, write_rows

        results_dir = self.cfg.layout.results_dir
        write_rows(items, ITEMS_SCHEMA, result_file(results_dir, "items", name))
        write_rows(rows, RESULTS_SCHEMA, result_file(results_dir, "metrics", name))  # last: marks it done


def run_expert_setting(base: Config, sub: Config, evaluate: Evaluator, progress: bool) -> None:
    """Seed, experts, Grams, merges, their evaluation, MSA and the expert distances of one setting."""
    from vlmerge.device import resolve_device
    from vlmerge.layout import list_checkpoints
    from vlmerge.merge.distance import write_parquet
    from vlmerge.merge.experts import expert_distance_rows, merge_experts
    from vlmerge.merge.grams import write_grams
    from vlmerge.sweep.plan import expert_seed
    from vlmerge.train.loop import train

    k = sub.runs.seed.epochs if sub.runs.seed_pretraining else 0
    if k:
        train_seed(base, sub, k, progress)
    run_dir = train(sub, EXPERT_RUN, progress=progress)
    checkpoints = list_checkpoints(run_dir)
    last = checkpoints[-1]
    seed = expert_seed(sub)
    write_grams(sub, last)
    by_method: dict[str, list[dict[str, float]]] = {}
    for method, params in merge_grid(base, sub.model.experts, k):
        by_method.setdefault(method, []).append(params)
    for method, settings in by_method.items():
        outs = [expert_merge_dir(run_dir, method, p) for p in settings]
        merge_experts(last, outs, method, settings, seed=seed)
        for out in outs:
            evaluate(out, study_result_name(sub.experiment, out.name))
    evaluate(last, study_result_name(sub.experiment, "msa"))
    distances = result_file(base.layout.results_dir, "distances", sub.experiment)
    if not distances.is_file():
        write_parquet(expert_distance_rows(last, seed, device=resolve_device(base.compute.device)), distances)


# The study in parts, for Slurm (jobs/study.sh): data → training array (MAA and each seed run) →
# settings array (one expert setting each) → report. `run_study` runs them all in this process.
PARTS = ("data", "train", "settings", "report")


def training_tasks(cfg: Config) -> list[int | None]:
    """The training array's tasks: MAA (None), then every seed run (K_seed > 0) the settings share."""
    return [None, *sorted({k for _, k in expert_settings(cfg) if k > 0})]


def prepare_study(cfg: Config, *, progress: bool = False) -> None:
    """The world's data stages, and every sub-experiment's links to the tokenizer and corpus (made
    here, once, so that array tasks never race to make them)."""
    from vlmerge.pipeline import run_data_stages

    run_data_stages(cfg, progress=progress)
    seeds = [("all", k) for k in training_tasks(cfg)[1:]]  # where each seed run is trained
    for sub in [maa_config(cfg), *(expert_config(cfg, v, k) for v, k in dict.fromkeys(expert_settings(cfg) + seeds))]:
        share_inputs(cfg, sub)


def run_training_task(cfg: Config, index: int, evaluate: Evaluator, *, progress: bool = False) -> None:
    """Task `index` of `training_tasks`: MAA trained and evaluated, or one seed run trained."""
    from vlmerge.layout import list_checkpoints
    from vlmerge.train.loop import train

    k = training_tasks(cfg)[index]
    if k is None:
        maa = maa_config(cfg)
        maa_last = list_checkpoints(train(maa, "multimodal", progress=progress))[-1]
        evaluate(maa_last, study_result_name(maa.experiment, "maa"))
    else:
        train_seed(cfg, expert_config(cfg, "all", k), k, progress)


def run_setting_task(cfg: Config, index: int, evaluate: Evaluator, *, progress: bool = False) -> None:
    """Setting `index` of `expert_settings`: its expert run, merges, evaluations and distances."""
    variant, k = expert_settings(cfg)[index]
    print(f"study: {variant} experts, seed {k} of {cfg.study.total_epochs} epochs")
    run_expert_setting(cfg, expert_config(cfg, variant, k), evaluate, progress)


def study_report(cfg: Config) -> Path:
    from vlmerge.analysis.sung import sung_report

    report = sung_report([cfg.layout.results_dir], cfg.layout.report_dir, cfg.analysis)
    print(f"study: report {report}")
    return report


def array_sizes(cfg: Config) -> tuple[int, int]:
    """(training tasks, setting tasks): the sizes of the study's two Slurm arrays."""
    return len(training_tasks(cfg)), len(expert_settings(cfg))


def run_part(cfg: Config, part: str, index: int | None = None, *, progress: bool = False) -> None:
    """One part of the study; for the arrays, task `index` or (None) every task in turn."""
    if part == "data":
        prepare_study(cfg, progress=progress)
    elif part == "report":
        study_report(cfg)
    else:
        task, count = (run_training_task, array_sizes(cfg)[0]) if part == "train" else \
            (run_setting_task, array_sizes(cfg)[1])
        if index is not None and not 0 <= index < count:
            raise VlmergeError(f"study --part {part} --index {index}: expected 0..{count - 1}")
        evaluate = Evaluator(cfg)
        for i in range(count) if index is None else [index]:
            task(cfg, i, evaluate, progress=progress)


def run_study(cfg: Config, *, progress: bool = False) -> Path:
    """Every run, merge and evaluation of the study, then its report; returns the report's path."""
    for part in PARTS[:-1]:
        run_part(cfg, part, progress=progress)
    return study_report(cfg)
