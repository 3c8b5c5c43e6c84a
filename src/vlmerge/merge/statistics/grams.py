"""RegMean's Gram matrices: G = Σ xᵀx of every linear layer's inputs, each model on its own data."""

from __future__ import annotations

import torch
from torch import nn

from vlmerge.merge.statistics import Batches, Specs, register
from vlmerge.model import Routed


def identity_grams(specs: Specs) -> dict[str, torch.Tensor]:
    """Identity Gram matrices of every 2-D weight but the embeddings: RegMean's solves cost the same."""
    return {n: torch.eye(shape[1], dtype=torch.float64) for n, shape in specs.items()
            if len(shape) == 2 and "embed" not in n}


@register("grams", "Gram matrices Σ xᵀx of each linear layer's inputs (RegMean)", stand_in=identity_grams)
def compute_grams(model: nn.Module, batches: Batches) -> tuple[dict[str, torch.Tensor], int]:
    """({'<linear>.weight': G}, tokens seen): sums over the non-padding positions of `batches` (for an
    expert's linear layer: over the positions routed to that expert)."""
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
