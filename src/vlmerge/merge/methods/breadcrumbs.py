"""Model Breadcrumbs (Davari & Belilovsky 2024), as mergekit's `breadcrumbs` and `breadcrumbs_ties`:

    δᵢ = τᵢ without its ⌊γ·n⌋ largest magnitudes (outliers) and its smallest, ⌊density·n⌋ kept
         (fewer outliers dropped where both do not fit); × ‖τᵢ‖₁/‖δᵢ‖₁ with rescale (default off)
    breadcrumbs:       θ = θ₀ + λ·(α·δ_text + (1−α)·δ_mm)
    breadcrumbs_ties:  θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·δᵢ [/ Σᵢ mᵢ·wᵢ with normalize],  mᵢ: TIES's sign election

Deterministic (no random draw). α = 1 (0): θ₀ + λ·δ_text (δ_mm); with density 1 (nothing
dropped, γ then has no effect) and λ = 1, the model itself.
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, register
from vlmerge.merge.methods.parts import breadcrumbs as crumbs
from vlmerge.merge.methods.parts import dense_unscaled_endpoint, task_vector_merge

COMMON = dict(density=Param(0.9, 0, 1), gamma=Param(0.01, 0, 1), lam=1.0, rescale=Param(False, choices=(False, True)))


@register("breadcrumbs", needs_base=True, same_as=dense_unscaled_endpoint, **COMMON)
def breadcrumbs(x: TensorInputs, alpha: float, density: float, gamma: float, lam: float, rescale: bool) -> torch.Tensor:
    return task_vector_merge(x, alpha, lambda tau, role: crumbs(tau, density, gamma, rescale),
                             consensus=False, normalize=False, lam=lam)


@register("breadcrumbs_ties", needs_base=True, same_as=dense_unscaled_endpoint,
          normalize=Param(False, choices=(False, True)), **COMMON)
def breadcrumbs_ties(x: TensorInputs, alpha: float, density: float, gamma: float, lam: float, rescale: bool,
                     normalize: bool) -> torch.Tensor:
    return task_vector_merge(x, alpha, lambda tau, role: crumbs(tau, density, gamma, rescale),
                             consensus=True, normalize=normalize, lam=lam)
