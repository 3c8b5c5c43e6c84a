"""TIES-merging (Yadav et al. 2023): trim each task vector to its top-k% magnitudes (per tensor,
or with one threshold over the whole model), elect a sign per entry, average the entries that
agree with it (weighted α, 1−α), and add λ times that to θ₀."""

from collections.abc import Iterable

import torch

from vlmerge.merge.methods import Param, TensorInputs, register


def magnitude_threshold(values: torch.Tensor, density: float) -> float:
    """The smallest magnitude among the `density` share of largest-magnitude entries."""
    flat = values.abs().flatten()
    k = int(round(density * flat.numel()))
    if k == 0:
        return float("inf")
    return flat.kthvalue(flat.numel() - k + 1).values.item()


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def disjoint_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect sign(Σ wᵢτᵢ) per entry; mean of the wᵢτᵢ that agree, over the weights that agree."""
    weighted = [w * t for w, t in zip(weights, taus)]
    sign = torch.sign(sum(weighted))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(torch.where(a, wt, torch.zeros_like(wt)) for a, wt in zip(agree, weighted))
    den = sum(a.to(num.dtype) * w for a, w in zip(agree, weights))
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


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
