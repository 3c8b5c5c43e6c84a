"""Fine-tuning chosen merges after the sweep (`sweep.finetune`), one work item per model and task.

Fine-tuning every merge of a sweep is unaffordable; the question is whether the best merges keep
the text twin's downstream ability. So each `sweep.finetune` entry selects merges of the sweep's
plan (a method, its parameters, an α or "best", a checkpoint pair by words seen), and the twins of
their pairs join them. A work item is one model × one task: a Slurm array runs one item per task
(`vlmerge sweep finetune --index K`). `vlmerge study` fine-tunes each of its models through the same
items. A merge is made in memory from its pair (or its expert checkpoint), as in the sweep, so no
merged weights are written; its rows go to the results datasets under the item's id:

    metrics/<ft-id>   one row per metric (task glue/<task>, or ft_<name>), written last: the item is done
    items/<ft-id>     each valid item's score (right 1 or wrong 0; VQA's soft score), for bootstrap intervals
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlmerge.config import Config, FinetuneSpec
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.run import load_model, load_tokenizer
from vlmerge.finetune.run import finetune_model, outcome_rows, read_config_task
from vlmerge.finetune.tasks import get_task
from vlmerge.io import fingerprint
from vlmerge.layout import checkpoint_words, result_files
from vlmerge.merge.core import PairMerger
from vlmerge.merge.experts import is_expert_method
from vlmerge.results import ITEMS_SCHEMA, MM_ALPHA, RESULTS_SCHEMA, TEXT_ALPHA, UNMERGED, ModelKey, checkpoint_run, write_rows
from vlmerge.sweep.plan import WorkItem, identity
from vlmerge.sweep.run import finished, items_path, metrics_path, open_experts, open_pair

ITEM_PREFIX = "ft-"


@dataclasses.dataclass(frozen=True)
class FinetuneItem:
    """One model fine-tuned on one task: a checkpoint as it is (method none: a twin, text or mm alone),
    or a merge of the pair, or of an expert checkpoint (`experts_*`: text and mm are that checkpoint)."""

    text: str | None  # checkpoint directories, relative to the output root
    mm: str | None
    method: str
    params: str  # JSON, sorted keys
    alpha: float | None  # None: a method without α (modality arithmetic)
    base: str | None
    task: str
    salt: str  # the task's data, the recipe, the prompt
    study: str = ""  # the study key of the model (`vlmerge study`), recorded in its rows

    @property
    def item_id(self) -> str:
        return ITEM_PREFIX + fingerprint(identity(self))[:12]

    def label(self) -> str:
        params = "" if self.params == "{}" else f" {self.params}"
        alpha = "" if self.alpha is None else f" α={self.alpha:g}"
        unmerged = "unmerged" if self.study else "multimodal twin"  # a study's MSA or MAA, or the sweep's twin
        model = ("text twin" if self.mm is None else unmerged if self.text is None
                 else f"{self.method}{params}{alpha}") + (f" {self.study}" if self.study else "")
        return f"{model} [{Path(self.mm or self.text).name}] × {self.task}"


def finetune_salt(cfg: Config, task: str) -> str:
    """What decides a fine-tuning's result besides the weights: the data, the recipe, the prompt."""
    recipe = cfg.finetune.model_dump(mode="json", exclude={"tasks"})
    return fingerprint([task, cfg.layout.relative(cfg.finetune.tasks.get(task)), recipe, cfg.eval.prompt,
                        cfg.layout.relative(cfg.eval.features), cfg.features.name])


def best_alphas(cfg: Config) -> dict[tuple[str, str, int, int], float]:
    """(method, params JSON, text words, mm words) -> the analysis's best α on the first text task."""
    from vlmerge.analysis.finetune import without_finetune
    from vlmerge.analysis.load import load, twin_results
    from vlmerge.analysis.run import compute

    task = next(iter(cfg.analysis.text_tasks), None)
    if task is None:
        raise VlmergeError('sweep.finetune: alpha "best" needs analysis.text_tasks')
    if not list(result_files(cfg.layout.results_dir, "metrics")):
        raise VlmergeError(f'sweep.finetune: alpha "best" reads the sweep\'s results, and {cfg.layout.results_dir} '
                           "has none yet: run the sweep first")
    loaded = without_finetune(load([cfg.layout.results_dir]))
    best = compute(twin_results(loaded), cfg.analysis.model_copy(update={"bootstrap": 0})).best
    best = best[(best.task == task) & best.best_alpha.notna()]
    return {(r.method, r.method_params, int(r.text_words), int(r.mm_words)): float(r.best_alpha)
            for r in best.itertuples()}


def _selected(spec: FinetuneSpec, sweep: list[WorkItem]) -> list[WorkItem]:
    """The sweep items (pairs) of a spec's method and parameters, at its words (default: the last pair's)."""
    chosen = [it for it in sweep if it.method == spec.method
              and (spec.params is None or json.loads(it.params) == spec.params)]
    if not chosen:
        raise VlmergeError(f"sweep.finetune: no {spec.method} merge with params {spec.params} in the sweep's plan")
    words = spec.words if spec.words is not None else max(checkpoint_words(Path(it.mm)) for it in chosen)
    chosen = [it for it in chosen if checkpoint_words(Path(it.mm)) == words]
    if not chosen:
        raise VlmergeError(f"sweep.finetune: no {spec.method} pair at {words} words (multimodal checkpoint)")
    return chosen


def finetune_plan(cfg: Config, sweep: list[WorkItem]) -> list[FinetuneItem]:
    """Every fine-tuning item of sweep.finetune, twins first, without repeats, in a stable order."""
    best = best_alphas(cfg) if any(s.alpha == "best" for s in cfg.sweep.finetune) else {}
    items: dict[str, FinetuneItem] = {}
    for spec in cfg.sweep.finetune:
        tasks = spec.tasks or list(cfg.finetune.tasks)
        unknown = [t for t in tasks if t not in cfg.finetune.tasks]
        if unknown or not tasks:
            raise VlmergeError(f"sweep.finetune: task {unknown[0]!r} has no folder in finetune.tasks" if unknown
                               else "sweep.finetune: no tasks (set finetune.tasks)")
        for it in _selected(spec, sweep):
            key = (it.method, it.params, checkpoint_words(Path(it.text)), checkpoint_words(Path(it.mm)))
            alpha = best.get(key) if spec.alpha == "best" else spec.alpha
            if alpha is None:
                print(f"sweep finetune: {it.method} at {key[3]} words: no best α in the results (none within "
                      f"the tolerance, or the sweep has not run); left out")
            for task in tasks:
                salt = finetune_salt(cfg, task)
                models = [FinetuneItem(it.text, None, UNMERGED, "{}", TEXT_ALPHA, None, task, salt),
                          FinetuneItem(None, it.mm, UNMERGED, "{}", MM_ALPHA, None, task, salt)]
                if alpha is not None:
                    models.append(FinetuneItem(it.text, it.mm, it.method, it.params, alpha, it.base, task, salt))
                items.update((m.item_id, m) for m in models)
    return sorted(items.values(), key=lambda m: (m.task, m.method != UNMERGED, m.mm or "", m.text or "", m.alpha))


def model_of(cfg: Config, item: FinetuneItem, device):
    """(model, tokenizer, ModelKey) of an item: a checkpoint as it is, or the merge made in memory."""
    root = cfg.root
    if item.method == UNMERGED:
        path = root / (item.text or item.mm)
        model, tokenizer = load_model(path, device)
        return model, tokenizer, ModelKey.twin(checkpoint_run(path), item.study)
    text, mm = root / item.text, root / item.mm
    params = json.loads(item.params)
    if not is_expert_method(item.method):
        model, tokenizer = load_model(text, device)
        PairMerger(open_pair(cfg, item.method, text, mm, root / item.base if item.base else None),
                   allow_extrapolation=cfg.sweep.allow_extrapolation, device=device).merge_into(
            model, item.method, item.alpha, params)
    else:
        merger = open_experts(cfg, item.method, text, root / item.base, device)
        model, tokenizer = merger.plain_model().to(device), load_tokenizer(text)
        merger.merge_into(model, item.alpha, params)
    key = ModelKey.of_pair(checkpoint_run(text), checkpoint_run(mm), item.method, item.params, item.study)
    return model, tokenizer, dataclasses.replace(key, alpha=item.alpha)


def run_item(cfg: Config, item: FinetuneItem, *, splits: dict | None = None, progress: bool = False,
             job_id: str = "") -> bool:
    """Fine-tune one item's model unless it is done (`splits`: its task's data, read already); whether it ran."""
    if finished(cfg, item.item_id):
        return False
    task = get_task(item.task)
    if splits is None:
        splits = read_config_task(cfg, item.task, "finetune")
    model, tokenizer, key = model_of(cfg, item, resolve_device(cfg.compute.device))
    outcome = finetune_model(cfg, model, tokenizer, task, splits, name=item.label(), progress=progress)
    rows, items = outcome_rows(key, task, outcome, item_id=item.item_id, config_hash=cfg.hash(), job_id=job_id)
    write_rows(items, ITEMS_SCHEMA, items_path(cfg, item.item_id))
    write_rows(rows, RESULTS_SCHEMA, metrics_path(cfg, item.item_id))  # last: the item is done
    scores = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
    print(f"sweep finetune: {item.label()}: {scores} ({outcome.seconds:.1f} s)")
    return True
