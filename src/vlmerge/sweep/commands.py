"""`vlmerge sweep plan|run|finetune`: the plan as a table or JSON; run one item, an array task's items, or all;
fine-tune the chosen merges and their twins (sweep.finetune) after the sweep."""

from __future__ import annotations

import json

from vlmerge.config import Config
from vlmerge.errors import VlmergeError
from vlmerge.sweep.plan import WorkItem, plan, worker_share
from vlmerge.sweep.run import best_text_pairing, is_done, run_items


def current_plan(cfg: Config) -> list[WorkItem]:
    return plan(cfg, best_text_pairing(cfg) if cfg.sweep.pairing == "best_text" else None)


def plan_command(cfg: Config, items: list[WorkItem], *, as_json: bool, array_tasks: tuple[int, int],
                 max_array_size: int) -> None:
    """Print the plan as a table (with its Slurm array layout) or as JSON."""
    if as_json:
        print(json.dumps([it.describe() | {"done": is_done(cfg, it)} for it in items], indent=1))
        return
    done = sum(is_done(cfg, it) for it in items)
    print(f"{'item':<13} {'method':<16} {'text checkpoint':<28} {'multimodal checkpoint':<28} {'α':>3} done")
    for it in items:
        print(f"{it.item_id:<13} {it.method:<16} {it.text.split('/')[-1]:<28} {it.mm.split('/')[-1]:<28} "
              f"{len(it.alphas):>3} {'yes' if is_done(cfg, it) else 'no'}")
    tasks, per_task = array_tasks
    print(f"sweep: {len(items)} work items ({done} done), {sum(max(len(it.alphas), 1) for it in items)} merged models; "
          f"as a Slurm array: {tasks} task(s) × {per_task} item(s)"
          + (f" (more items than MaxArraySize {max_array_size}: packed)" if per_task > 1 else ""))


def run_command(cfg: Config, *, item_id: str | None, index: int | None, per_task: int, progress: bool,
                job_id: str = "", worker: tuple[int, int] | None = None) -> None:
    """Run one item, the items of one array task (`index`), or every item; as worker k of n
    (`worker`), this worker's share of them (`worker_share`)."""
    items = current_plan(cfg)
    if item_id is not None:
        chosen = [it for it in items if it.item_id == item_id]
        if not chosen:
            raise VlmergeError(f"--item {item_id}: not in the plan (vlmerge sweep plan lists the items)")
    else:
        chosen = items if index is None else items[index * per_task : (index + 1) * per_task]
        if index is not None and not chosen:
            raise VlmergeError(f"array index {index} × {per_task} is past the plan's {len(items)} items")
    if worker is not None:
        chosen = worker_share(chosen, *worker)
    ran = run_items(cfg, chosen, progress=progress, job_id=job_id)
    print(f"sweep: {ran} item(s) run, {len(chosen) - ran} already done")


def finetune_command(cfg: Config, *, index: int | None, count_only: bool, progress: bool, job_id: str = "") -> int:
    """Fine-tune every item of sweep.finetune, or array task `index`'s one item; `count_only`: print how many
    items there are (the Slurm array's size). Returns the items run."""
    from vlmerge.sweep.finetune import finetune_plan, run_item

    if not cfg.sweep.finetune:
        raise VlmergeError("sweep finetune: sweep.finetune selects no merge")
    items = finetune_plan(cfg, current_plan(cfg))
    if count_only:
        print(len(items))
        return 0
    if index is not None and not 0 <= index < len(items):
        raise VlmergeError(f"array index {index}: the fine-tuning plan has {len(items)} items")
    chosen = items if index is None else [items[index]]
    ran = sum(run_item(cfg, it, progress=progress, job_id=job_id) for it in chosen)
    print(f"sweep finetune: {ran} item(s) run, {len(chosen) - ran} already done")
    return ran
