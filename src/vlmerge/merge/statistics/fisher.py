"""Fisher merging's diagonal Fisher (Matena & Raffel 2022), each model on its own data.

The empirical Fisher of every trained parameter: F = mean over sequences of (∂ log p(sequence)/∂θ)²,
log p(sequence) the sum of its target tokens' log-likelihoods (the training loss's tokens). One
backward pass per sequence: the square of a batch's summed gradient would mix the sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmerge.merge.statistics import Batches, Specs, register


def unit_fisher(specs: Specs) -> dict[str, torch.Tensor]:
    return {n: torch.ones(shape, dtype=torch.float64) for n, shape in specs.items()}


@register("fisher", "diagonal empirical Fisher: the mean over sequences of the squared gradient of log p(sequence)",
          stand_in=unit_fisher)
def compute_fisher(model: nn.Module, batches: Batches) -> tuple[dict[str, torch.Tensor], int]:
    """({parameter name: F}, tokens seen), float64, in the model's eval mode (no dropout)."""
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
    sequences = tokens = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for i in range(len(batch["input_ids"])):
            one = {k: v[i: i + 1] for k, v in batch.items()}
            targets = int((one["labels"][:, 1:] != -100).sum())  # the loss averages over these
            if targets == 0:
                continue
            model.zero_grad(set_to_none=True)
            (model(**one).loss * targets).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.double().square()
            sequences += 1
            tokens += int(one["attention_mask"].sum())
    model.zero_grad(set_to_none=True)
    return {n: f / max(sequences, 1) for n, f in fisher.items()}, tokens
