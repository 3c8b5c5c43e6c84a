"""Data statistics that data-based merge methods need (a method's `statistics`), one module of
this package each: RegMean's Gram matrices (`grams`), Fisher merging's diagonal Fisher (`fisher`).

`vlmerge statistics --statistic NAME --checkpoint CKPT` runs the checkpoint on
`sweep.statistics_batches` batches of its run's training data (the text twin on text, the
multimodal twin on text and captions, an expert model with its routing) and saves float64
tensors beside it (`layout.statistics_file`), keyed by the weight's name; every α and parameter
reuses them. The file records the settings that decide it (`settings`); a file of other settings
is computed again, and a work item that merges with statistics names their settings in its
identity, so a changed `sweep.statistics_batches` never reuses stale statistics or stale scores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlmerge.config import EXPERT_RUN, Config
from vlmerge.data import epoch_order, plan_batches, run_data
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.hf import quiet_transformers
from vlmerge.io import atomic_path
from vlmerge.layout import statistics_file
from vlmerge.problems import ProblemLog
from vlmerge.registry import Registry, import_submodules

Batches = Iterable[dict[str, torch.Tensor]]


Specs = dict[str, tuple[int, ...]]  # the floating-point tensors of a model: name -> shape


@dataclasses.dataclass(frozen=True)
class Statistic:
    """compute(model, batches) -> ({weight name: float64 tensor}, tokens seen), on the model's device;
    stand_in(specs): tensors of the same names and shapes, for timing a merge before any data
    (`sweep plan --estimate`)."""

    name: str
    compute: Callable[[nn.Module, Batches], tuple[dict[str, torch.Tensor], int]]
    description: str
    stand_in: Callable[[Specs], dict[str, torch.Tensor]]


STATISTICS: Registry[Statistic] = Registry("data statistic")


def register(name: str, description: str, stand_in: Callable[[Specs], dict[str, torch.Tensor]]):
    """Decorator: make `compute` the data statistic `name`."""
    def wrap(compute: Callable[[nn.Module, Batches], tuple[dict[str, torch.Tensor], int]]):
        STATISTICS.add(name, Statistic(name, compute, description, stand_in))
        return compute

    return wrap


def settings(cfg: Config) -> dict[str, int]:
    """What decides a checkpoint's statistics besides its weights and data: how many batches, of what
    size, in which order."""
    return {"batches": cfg.sweep.statistics_batches, "micro_batch_size": cfg.train.micro_batch_size,
            "seed": cfg.train.seed}


def saved_settings(path: Path) -> dict | None:
    """The settings a statistics file was computed with (None: an older file that does not say)."""
    with safe_open(path, "pt") as f:
        saved = (f.metadata() or {}).get("settings")
    return json.loads(saved) if saved else None


def write_statistics(cfg: Config, checkpoint: Path, names: Sequence[str]) -> None:
    """Compute and save the statistics `names` of one run checkpoint on compute.device (each skipped if
    saved already with these settings; computed again over a file of other settings)."""
    todo = [STATISTICS.lookup(n) for n in names]
    todo = [s for s in todo if not (statistics_file(checkpoint, s.name).is_file()
                                    and saved_settings(statistics_file(checkpoint, s.name)) == settings(cfg))]
    if not todo:
        return
    from transformers import AutoModelForImageTextToText

    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        raise VlmergeError(f"{checkpoint}: not a run checkpoint (no trainer_state.json)")
    run = json.loads(state_path.read_text())["run"]
    data = run_data(cfg, getattr(cfg.runs, run).sources, ProblemLog(), multimodal_flags=run == EXPERT_RUN)
    order = epoch_order(len(data.samples), cfg.train.seed, 0)
    plan = plan_batches(order, data.samples.words, cfg.train.micro_batch_size, [], 0)
    pieces = [b.pieces for _, b in zip(range(cfg.sweep.statistics_batches), plan)]
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, use_safetensors=True).to(resolve_device(cfg.compute.device)).eval()
    for statistic in todo:
        tensors, tokens = statistic.compute(model, (data.collate(p) for p in pieces))
        with atomic_path(statistics_file(checkpoint, statistic.name)) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"run": run, "statistic": statistic.name, "tokens": str(tokens),
                                "settings": json.dumps(settings(cfg), sort_keys=True)})


def load_statistics(checkpoint: Path, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{statistic: {weight name: tensor}} of one checkpoint, or a one-line error naming the missing file."""
    from safetensors.torch import load_file

    out = {}
    for name in names:
        path = statistics_file(checkpoint, STATISTICS.lookup(name).name)
        if not path.is_file():
            raise VlmergeError(f"{checkpoint}: no {path.name}; compute it with "
                               f"`vlmerge statistics --statistic {name} --checkpoint {checkpoint}`")
        out[name] = load_file(path)
    return out


import_submodules(__name__, __path__)
