"""RegMean's Gram matrices: G = Σ xᵀx of every linear layer's inputs, each model on its own data.

`vlmerge grams --run text --checkpoint CKPT` runs the checkpoint on `sweep.gram_batches`
batches of its run's training data (the text twin on text, the multimodal twin on text and
captions) and saves float64 sums beside it, in `regmean-grams.safetensors`, keyed by the
linear layer's weight name; every α and γ reuses them. The file records the settings that decide
the sums (`gram_settings`); Grams of other settings are computed again, and a work item that merges
with Grams names those settings in its identity, so a changed `sweep.gram_batches` never reuses
stale statistics or stale scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
from vlmerge.layout import grams_file
from vlmerge.model import Routed
from vlmerge.problems import ProblemLog


def compute_grams(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
    """({'<linear>.weight': G}, tokens seen): sums over the non-padding positions of `batches`, run on
    the model's device (for an expert's linear layer: over the positions routed to that expert)."""
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []  # the current batch's attention mask, read by the hooks
    # An expert's linear layer runs on every token (see Routed): its module name -> (router, index)
    routed = {f"{n}.experts.{e}": (m, k) for n, m in model.named_modules() if isinstance(m, Routed)
              for k, e in enumerate(m.experts)}

    def hook(name: str):
        router = routed.get(name.removesuffix(".weight"))

        def record(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            if x.dim() == 3:  # [batch, tokens, in]: padding positions carry no data
                keep = mask[0].bool()
                if router is not None:
                    keep = keep & (router[0].route == router[1])
                x = x[keep]
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    tokens = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                mask[:] = [batch["attention_mask"]]
                model(**{k: v for k, v in batch.items() if k != "labels"})
                tokens += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return grams, tokens


def gram_settings(cfg: Config) -> dict[str, int]:
    """What decides a checkpoint's Gram sums besides its weights and data: how many batches, of what
    size, in which order."""
    return {"batches": cfg.sweep.gram_batches, "micro_batch_size": cfg.train.micro_batch_size, "seed": cfg.train.seed}


def saved_settings(path: Path) -> dict | None:
    """The settings a Gram file was computed with (None: an older file that does not say)."""
    with safe_open(path, "pt") as f:
        saved = (f.metadata() or {}).get("settings")
    return json.loads(saved) if saved else None


def write_grams(cfg: Config, checkpoint: Path) -> Path:
    """Compute and save the Gram matrices of one run checkpoint on compute.device (skipped if saved
    already with these settings; computed again over a file of other settings)."""
    from transformers import AutoModelForImageTextToText

    out = grams_file(checkpoint)
    settings = gram_settings(cfg)
    if out.is_file() and saved_settings(out) == settings:
        return out
    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        raise VlmergeError(f"{checkpoint}: not a run checkpoint (no trainer_state.json)")
    run = json.loads(state_path.read_text())["run"]
    data = run_data(cfg, getattr(cfg.runs, run).sources, ProblemLog(), multimodal_flags=run == EXPERT_RUN)
    order = epoch_order(len(data.samples), cfg.train.seed, 0)
    plan = plan_batches(order, data.samples.words, cfg.train.micro_batch_size, [], 0)
    batches = (data.collate(b.pieces) for _, b in zip(range(cfg.sweep.gram_batches), plan))
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(checkpoint).to(resolve_device(cfg.compute.device)).eval()
    grams, tokens = compute_grams(model, batches)
    with atomic_path(out) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in grams.items()}, tmp,
                  metadata={"run": run, "batches": str(cfg.sweep.gram_batches), "tokens": str(tokens),
                            "settings": json.dumps(settings, sort_keys=True)})
    return out
