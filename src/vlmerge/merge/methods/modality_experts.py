"""Sung et al.'s (2023, §4.1) merges of a modality-expert model into one agnostic model.

Per expert-specific tensor, with W^v, W^l (and W^vl in the top `cross_modal_layers` layers) as the
inputs `vision`, `language` (and `cross`); α is the weight of the VISION expert:

    experts_interpolation   α·W^v + (1−α)·W^l;  ⅔(α·W^v + (1−α)·W^l) + ⅓·W^vl where W^vl exists
    experts_arithmetic      W_seed + λ·Σ_m (W^m − W_seed)       (base: the seed run's weights; no α)
    experts_regmean         per linear layer, RegMean over the experts with the Grams of the tokens
                            routed to each, weighted as interpolation; other tensors interpolated

`vlmerge.merge.experts` reads an expert checkpoint into these inputs, tensor by tensor.
"""

from collections.abc import Sequence

import torch

from vlmerge.merge.methods import EXPERTS, Param, TensorInputs, register
from vlmerge.merge.methods.regmean import regmean_weight
from vlmerge.model import CROSS, LANGUAGE, VISION


def coefficients(alpha: float, experts: Sequence[str]) -> dict[str, float]:
    """Each expert's weight: α (vision), 1−α (language); ⅔ of those and ⅓ (cross-modal) where it exists."""
    c = {VISION: alpha, LANGUAGE: 1.0 - alpha}
    if CROSS in experts:
        c = {k: 2.0 / 3.0 * v for k, v in c.items()} | {CROSS: 1.0 / 3.0}
    return c


@register("experts_interpolation", inputs=EXPERTS)
def interpolation(x: TensorInputs, alpha: float) -> torch.Tensor:
    c = coefficients(alpha, list(x.models))
    return sum(c[e] * w for e, w in x.models.items())


@register("experts_arithmetic", inputs=EXPERTS, takes_alpha=False, needs_base=True, lam=0.5)
def arithmetic(x: TensorInputs, alpha: None, lam: float) -> torch.Tensor:
    """W_seed + λ·Σ_m (W^m − W_seed)."""
    return x.base + lam * sum(w - x.base for w in x.models.values())


@register("experts_regmean", inputs=EXPERTS, statistics=("grams",), gamma=Param(0.9, 0, 1))
def regmean(x: TensorInputs, alpha: float, gamma: float) -> torch.Tensor:
    """RegMean over the experts of one linear layer, each weighted as in interpolation; a tensor
    without Grams (norms) interpolated."""
    grams = x.statistics.get("grams")
    if grams is None:
        return interpolation(x, alpha)
    c = coefficients(alpha, list(x.models))
    names = list(x.models)
    return regmean_weight([x.models[e] for e in names], [grams[e] for e in names], [c[e] for e in names], gamma)
