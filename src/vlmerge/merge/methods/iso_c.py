"""ISO-C, isotropic merging in the common subspace (Marczak et al. 2025, as FusionBench's
`iso_c`), per 2-D tensor:

    τ = α·τ_text + (1−α)·τ_mm = U Σ Vᵀ;   θ = θ₀ + λ·σ̄·U Vᵀ,   σ̄ = the mean singular value

(every singular value replaced by their mean: a flat spectrum). FusionBench sums the task
vectors (τ_text + τ_mm: twice ours at α = ½, so its λ is half ours) and averages them on other
tensors; here every tensor takes the weighted sum, and other tensors (1-D) are task arithmetic,
θ₀ + λ·τ. In float32, as FusionBench.

α = 1 (0): θ₀ + λ·σ̄·U Vᵀ of τ_text (τ_mm) on 2-D tensors (not the model: its spectrum is
flattened); identical task vectors: the same of their common τ.
"""

import torch

from vlmerge.merge.methods import TensorInputs, register


def isotropic(tau: torch.Tensor) -> torch.Tensor:
    """U·diag(mean σ)·Vᵀ of a 2-D tensor."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


@register("iso_c", needs_base=True, lam=1.0)
def iso_c(x: TensorInputs, alpha: float, lam: float) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    tau = alpha * tau_text + (1 - alpha) * tau_mm
    return x.base + lam * (isotropic(tau) if tau.dim() == 2 else tau)
