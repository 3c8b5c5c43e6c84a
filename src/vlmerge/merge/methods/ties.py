"""TIES-merging (Yadav et al. 2023): trim each task vector to its top-k% magnitudes (per tensor,
or with one threshold over the whole model), elect a sign per entry, average the entries that
agree with it (weighted α, 1−α), and add λ times that to θ₀."""

from collections.abc import Iterable

import torch

from vlmerge.merge.methods import Param, TensorInputs, register
from vlmerge.merge.methods.parts import disjoint_mean, magnitude_threshold, trim


def whole_model_thresholds(inputs: Iterable[TensorInputs], params: dict) -> dict:
    """With scope=model, one magnitude threshold per task vector over all tensors."""
    if params["scope"] == "tensor":
        return {}
    text, mm = zip(*(x.task_vectors() for x in inputs))
    flat = [torch.cat([t.float().flatten() for t in side]) for side in (text, mm)]
    return {"thresholds": tuple(magnitude_threshold(f, params["density"]) for f in flat)}


@register("ties", needs_base=True, prepare=whole_model_thresholds, density=Param(0.2, 0, 1), lam=1.0,
          scope=Param("tensor", choices=("tensor", "model")))
def ties(x: TensorInputs, alpha: float, density: float, lam: float, scope: str,
         thresholds: tuple[float, float] | None = None) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    if thresholds is None:
        thresholds = (magnitude_threshold(tau_text, density), magnitude_threshold(tau_mm, density))
    taus = [trim(tau_text, thresholds[0]), trim(tau_mm, thresholds[1])]
    return x.base + lam * disjoint_mean(taus, [alpha, 1 - alpha])
