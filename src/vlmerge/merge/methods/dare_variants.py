"""DARE as mergekit's `dare_linear` and `dare_ties` (Yu et al. 2024):

    δᵢ = rescale(τᵢ·Mᵢ),  Mᵢ ~ Bernoulli(density) per entry,  τ = θ − θ₀,
    dare_linear:  θ = θ₀ + λ·(α·δ_text + (1−α)·δ_mm)
    dare_ties:    θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·δᵢ [/ Σᵢ mᵢ·wᵢ with normalize],  mᵢ: TIES's sign election

rescale (default on) is mergekit's: the kept entries are scaled so that the L1 norm is τ's,
‖τ‖₁/‖τ·M‖₁, where the paper's DARE scales them by 1/density. So `dare_linear` is not the
maths of `dare` (the paper's rule, kept as it was): it shares its random draw (parts.uniforms,
seeded per seed, input and tensor), not its rescaling. `density` is the keep probability (dare's
p is the drop probability).

α = 1 (0): θ₀ + λ·δ_text (δ_mm); with density 1 and λ = 1 that is the model itself.
"""

import torch

from vlmerge.merge.methods import SEED, Param, TensorInputs, register
from vlmerge.merge.methods.parts import dense_unscaled_endpoint, random_drop, task_vector_merge, uniforms

COMMON = dict(density=Param(0.5, 0, 1), lam=1.0, rescale=Param(True, choices=(True, False)), seed=SEED)


def dropper(x: TensorInputs, density: float, rescale: bool, seed: int):
    def sparsify(tau: torch.Tensor, role: str) -> torch.Tensor:
        return random_drop(tau, density, uniforms(tau.shape, seed, role, x.name, tau.device), rescale)
    return sparsify


@register("dare_linear", needs_base=True, same_as=dense_unscaled_endpoint, **COMMON)
def dare_linear(x: TensorInputs, alpha: float, density: float, lam: float, rescale: bool, seed: int) -> torch.Tensor:
    return task_vector_merge(x, alpha, dropper(x, density, rescale, seed), consensus=False, normalize=False, lam=lam)


@register("dare_ties", needs_base=True, same_as=dense_unscaled_endpoint, normalize=Param(False, choices=(False, True)),
          **COMMON)
def dare_ties(x: TensorInputs, alpha: float, density: float, lam: float, rescale: bool, seed: int,
              normalize: bool) -> torch.Tensor:
    return task_vector_merge(x, alpha, dropper(x, density, rescale, seed), consensus=True, normalize=normalize, lam=lam)
