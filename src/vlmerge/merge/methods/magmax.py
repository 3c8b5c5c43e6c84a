"""MagMax (Marczak et al. 2024, as in FusionBench): per entry, the task-vector entry of largest
magnitude, scaled by λ. α weights the task vectors before the selection:

    θ = θ₀ + λ·sel(α·τ_text, (1−α)·τ_mm),   sel(a, b) = b where |b| ≥ |a|, else a

(ties go to the later task vector, mm, as FusionBench's and the official `>=`). At α = ½ with
λ = 1 this is FusionBench's MagMax with its default scaling_factor 0.5. α = 1 (0): the zero
weighted other task vector never wins where the chosen one is nonzero, so θ₀ + λ·τ_text
(τ_mm); with λ = 1, the model itself.
"""

import torch

from vlmerge.merge.methods import TensorInputs, register
from vlmerge.merge.methods.task_arithmetic import unscaled_endpoint


@register("magmax", needs_base=True, same_as=unscaled_endpoint, lam=1.0)
def magmax(x: TensorInputs, alpha: float, lam: float) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    a, b = alpha * tau_text, (1 - alpha) * tau_mm
    return x.base + lam * torch.where(b.abs() >= a.abs(), b, a)
