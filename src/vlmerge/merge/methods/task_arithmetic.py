"""Task (modality) arithmetic: θ = θ₀ + λ·(α·τ_text + (1−α)·τ_mm), τ = θ − θ₀.

λ = 1 coincides with linear interpolation; λ = 2 at α = 0.5 is the plain sum θ₀ + Σ τ_i.
"""

import torch

from vlmerge.merge.methods import TensorInputs, endpoint, register


def unscaled_endpoint(alpha: float, params: dict) -> str | None:
    """With λ = 1, α = 1 and 0 give θ₀ + τ_text = θ_text and θ₀ + τ_mm = θ_mm."""
    return endpoint(alpha, params) if params["lam"] == 1 else None


@register("task_arithmetic", needs_base=True, same_as=unscaled_endpoint, lam=1.0)
def task_arithmetic(x: TensorInputs, alpha: float, lam: float) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    return x.base + lam * (alpha * tau_text + (1 - alpha) * tau_mm)
