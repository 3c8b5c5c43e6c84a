"""DARE (Yu et al. 2024): drop each task-vector entry with probability p, rescale the rest by
1/(1−p), then task arithmetic. Seeded per tensor, so a merge is reproducible."""

import torch

from vlmerge.merge.methods import SEED, Param, TensorInputs, register
from vlmerge.merge.methods.parts import generator


def drop_and_rescale(tau: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """`gen` is a CPU generator: the mask is drawn on the host, so that a merge on a GPU drops
    the same entries as on the CPU."""
    if p == 0:
        return tau
    keep = (torch.rand(tau.shape, generator=gen) >= p).to(tau.device)
    return torch.where(keep, tau / (1 - p), torch.zeros_like(tau))


@register("dare", needs_base=True, p=Param(0.5, 0, 1, high_open=True), lam=1.0, seed=SEED)  # survivors scale by 1/(1−p)
def dare(x: TensorInputs, alpha: float, p: float, lam: float, seed: int) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    # Each (seed, tensor, model) has its own stream: the result does not depend on tensor order.
    g_text, g_mm = generator(seed, "text", x.name), generator(seed, "mm", x.name)
    merged = alpha * drop_and_rescale(tau_text, p, g_text) + (1 - alpha) * drop_and_rescale(tau_mm, p, g_mm)
    return x.base + lam * merged
