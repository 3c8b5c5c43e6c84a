"""TIES-merging (Yadav et al. 2023), as mergekit's `ties`:

    θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·trim(τᵢ) / Σᵢ mᵢ·wᵢ,   w = (α, 1−α) for (text, mm), τ = θ − θ₀,

where trim keeps each task vector's max(1, ⌊density·n⌋) largest magnitudes in the tensor (or,
scope=model, the entries that reach one threshold over the whole model, found with that count),
and mᵢ says whether wᵢ·trim(τᵢ) has the elected sign, that of Σᵢ wᵢ·trim(τᵢ) (+ where it is 0).

α = 1 (0): θ₀ + λ·trim(τ_text) (trim(τ_mm)); with density 1 and λ = 1 that is the model itself.
"""

from collections.abc import Iterable

import torch

from vlmerge.merge.methods import Param, TensorInputs, register
from vlmerge.merge.methods.parts import dense_unscaled_endpoint, magnitude, magnitude_threshold, task_vector_merge, trim


def whole_model_thresholds(inputs: Iterable[TensorInputs], params: dict) -> dict:
    """With scope=model, one magnitude threshold per task vector over all tensors."""
    if params["scope"] == "tensor":
        return {}
    text, mm = zip(*(x.task_vectors() for x in inputs))
    flat = [torch.cat([t.float().flatten() for t in side]) for side in (text, mm)]
    return {"thresholds": tuple(magnitude_threshold(f, params["density"]) for f in flat)}


@register("ties", needs_base=True, prepare=whole_model_thresholds, same_as=dense_unscaled_endpoint,
          density=Param(0.2, 0, 1), lam=1.0, scope=Param("tensor", choices=("tensor", "model")))
def ties(x: TensorInputs, alpha: float, density: float, lam: float, scope: str,
         thresholds: tuple[float, float] | None = None) -> torch.Tensor:
    if thresholds is None:
        def sparsify(tau, role):
            return magnitude(tau, density)
    else:
        def sparsify(tau, role):
            return trim(tau, thresholds[0 if role == "text" else 1])
    return task_vector_merge(x, alpha, sparsify, consensus=True, normalize=True, lam=lam)
