"""`vlmerge finetune`: BabyLM's (Super)GLUE fine-tuning of one model, task by task.

Each task's outputs go to one folder, `<out>/finetune/<task>/`, written whole (a temp folder
renamed): the pipeline's `results.txt` and `predictions.json`, and our `results.parquet` (task
`glue/<task>`, one row per metric) and `items.parquet` (each valid item right or wrong, for
bootstrap intervals). A rerun skips the tasks whose folder exists; a killed run leaves no folder
and starts its task again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from vlmerge.config import Config, FinetuneConfig, task_paths
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.scoring import IMAGE_TOKEN, resolve_prompt
from vlmerge.finetune.loop import ImageInputs, Outcome, Recipe, Run
from vlmerge.finetune.tasks import TASKS, Example, FinetuneTask, get_task, read_task
from vlmerge.io import atomic_path, check_creatable, remove_stale_temps
from vlmerge.layout import (eval_items_file, eval_results_file, finetune_dir, finetune_predictions_file,
                            finetune_scores_file)
from vlmerge.problems import ProblemLog
from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, ModelKey, stamp, write_rows

def recipe(fc: FinetuneConfig, task: FinetuneTask) -> Recipe:
    """The task's recipe: the common one, with eval_finetuning.sh's big batch (boolq, multirc) and long
    schedule (wsc), then what finetune.recipes sets for the task."""
    common = Recipe(lr=fc.lr, batch_size=fc.big_batch_size if task.big_batch else fc.batch_size,
                    epochs=fc.wsc_epochs if task.long_schedule else fc.epochs, seed=fc.seed, max_length=fc.max_length,
                    valid_batch_size=fc.valid_batch_size, dropout=fc.dropout, layer_norm_eps=fc.layer_norm_eps,
                    weight_decay=fc.weight_decay, warmup_proportion=fc.warmup_proportion, min_factor=fc.min_factor,
                    betas=fc.betas, eps=fc.eps, padding_side=fc.padding_side)
    unknown = [t for t in fc.recipes if t not in TASKS]
    if unknown:  # (checked here, where every fine-tuning takes its recipe before it trains)
        raise VlmergeError(f"finetune.recipes: {unknown[0]!r} is not a fine-tuning task (known: {', '.join(sorted(TASKS))})")
    own = fc.recipes.get(task.name)
    return dataclasses.replace(common, **own.model_dump(exclude_none=True)) if own else common


def task_folder(cfg: Config, name: str, owner: str) -> Path:
    """The folder of task `name` in finetune.tasks (`owner`: the setting that names the task, for the error)."""
    if name not in cfg.finetune.tasks:
        raise VlmergeError(f"{owner}: {name!r} has no folder in finetune.tasks")
    return Path(cfg.finetune.tasks[name])


def read_config_task(cfg: Config, name: str, owner: str) -> dict[str, list[Example]]:
    """The splits of task `name` from its folder in finetune.tasks, its per-line problems reported."""
    problems = ProblemLog()
    splits = read_task(get_task(name), task_folder(cfg, name, owner), problems, cfg.finetune)
    problems.report(f"{owner} {name}")
    return splits


def task_specs(cfg: Config, given: Sequence[str]) -> list[tuple[FinetuneTask, Path]]:
    """`NAME` (folder from finetune.tasks) or `NAME=FOLDER`; none given: every task of finetune.tasks."""
    return [(get_task(name), folder) for name, folder in task_paths(given, cfg.finetune.tasks, "finetune.tasks")]


def image_inputs(cfg: Config, model: torch.nn.Module) -> ImageInputs | None:
    """How the model sees images, by `eval.prompt`: our multimodal models read each example's images
    from the evaluation store (the black image's feature for a text task), behind "<image> "
    (takmaz2025); a text model reads the text alone."""
    prompt = resolve_prompt(cfg.eval.prompt, getattr(model.config, "image_token_index", None))
    if prompt == "legacy":
        raise VlmergeError("finetune: eval.prompt legacy is a scoring convention; use takmaz2025 or text")
    if prompt == "text":
        return None
    from vlmerge.data import FeatureTable  # (its imports would cost a text model's fine-tuning a second)

    features = FeatureTable(cfg.eval_store_path)
    tokens = getattr(model.config, "image_seq_length", 1)
    if features.tokens != tokens:
        raise VlmergeError(f"{cfg.eval_store_path}: {features.tokens} image tokens per image, the model takes {tokens}")
    return ImageInputs(features, IMAGE_TOKEN * tokens)


def finetune_model(cfg: Config, model: torch.nn.Module, tokenizer, task: FinetuneTask, splits: dict[str, list[Example]],
                   *, name: str, progress: bool = False) -> Outcome:
    """Fine-tune `model` (changed in place: give a copy; `name` names it in errors) on one task; the kept
    epoch's valid scores."""
    return Run(model, tokenizer, task, splits, recipe(cfg.finetune, task), images=image_inputs(cfg, model),
               name=name).run(progress)


def outcome_rows(key: ModelKey, task: FinetuneTask, outcome: Outcome, *, item_id: str = "", config_hash: str = "",
                 job_id: str = "") -> tuple[list[dict], list[dict]]:
    """Rows of the results (one per metric) and items (each valid item's score: `Outcome.item_scores`) datasets."""
    model, prov, n = key.columns(item_id), stamp(config_hash, job_id), len(outcome.labels)
    name = task.result_name
    rows = [{**model, "task": name, "subtask": "", "metric": m, "value": v, "n": n, **prov}
            for m, v in outcome.metrics.items()]
    items = [{**model, "task": name, "subtask": "", "example_id": f"{task.name}_{i}", "value": float(v)}
             for i, v in enumerate(outcome.item_scores())]
    return rows, items


def write_task_folder(out: Path, task: FinetuneTask, outcome: Outcome, rows: list[dict], items: list[dict]) -> Path:
    """`out/finetune/<task>/`: the pipeline's results.txt and predictions.json, and our Parquet rows, as one folder."""
    folder = finetune_dir(out, task.name)
    with atomic_path(folder, is_dir=True) as tmp:
        finetune_scores_file(tmp).write_text("\n".join(f"{k}: {v}" for k, v in outcome.metrics.items()))
        predictions = [{"id": f"{task.name}_{i}", "pred": int(p)} for i, p in enumerate(outcome.preds)]
        finetune_predictions_file(tmp).write_text(
            json.dumps({task.name: {"predictions": predictions}}))
        write_rows(rows, RESULTS_SCHEMA, eval_results_file(tmp))
        write_rows(items, ITEMS_SCHEMA, eval_items_file(tmp))
    return folder


def finetune_command(cfg: Config, model_dir: Path, tasks: Sequence[str], *, out: Path, progress: bool = False,
                     job_id: str = "") -> dict[str, Outcome]:
    from vlmerge.evaluate.run import load_model

    specs = task_specs(cfg, tasks)
    check_creatable(out)
    remove_stale_temps(out / "finetune")
    done = [t for t, _ in specs if finetune_dir(out, t.name).is_dir()]
    for t in done:
        print(f"finetune {t.name}: done before ({finetune_dir(out, t.name)})")
    todo = [(t, folder) for t, folder in specs if t not in done]
    problems = ProblemLog()
    data = {t.name: read_task(t, folder, problems, cfg.finetune) for t, folder in todo}  # every file read before any training
    problems.report("finetune")
    if not todo:
        return {}
    model, tokenizer = load_model(model_dir, resolve_device(cfg.compute.device))
    # every task starts from the pretrained weights (a copy of them only when a second task needs it)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()} if len(todo) > 1 else None
    key, outcomes = ModelKey.of_directory(model_dir), {}
    for k, (task, _) in enumerate(todo):
        if k:
            model.load_state_dict(pretrained)
        outcome = outcomes[task.name] = finetune_model(cfg, model, tokenizer, task, data[task.name],
                                                       name=str(model_dir), progress=progress)
        rows, items = outcome_rows(key, task, outcome, config_hash=cfg.hash(), job_id=job_id)
        folder = write_task_folder(out, task, outcome, rows, items)
        scores = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
        print(f"finetune {task.name}: {scores} (epoch {outcome.best_epoch + 1} kept, {outcome.steps} steps, "
              f"{outcome.seconds:.1f} s) -> {folder}")
    return outcomes

