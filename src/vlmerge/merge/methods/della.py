"""DELLA (Deep et al. 2024), as mergekit's `della` and `della_linear`:

    δᵢ = rescale(τᵢ·Mᵢ),  Mᵢ ~ Bernoulli(pᵢ) per entry, pᵢ from density − ε (the smallest
         magnitude of its row) to density + ε (the largest), linear in the magnitude's rank in
         the row (a 1-D tensor is one row); rescale (default on): × ‖τᵢ‖₁/‖τᵢ·Mᵢ‖₁ (mergekit's;
         the paper scales each kept entry by 1/pᵢ)
    della:         θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·δᵢ [/ Σᵢ mᵢ·wᵢ with normalize, default on],  mᵢ: TIES's sign election
    della_linear:  θ = θ₀ + λ·(α·δ_text + (1−α)·δ_mm)

density ± ε must lie in (0, 1) when 0 < density < 1 (mergekit's rule). The draw is seeded per
seed, input and tensor (parts.uniforms). α = 1 (0): θ₀ + λ·δ_text (δ_mm); with density 1 and
λ = 1 that is the model itself.
"""

from collections.abc import Iterable

import torch

from vlmerge.errors import VlmergeError
from vlmerge.merge.methods import SEED, Param, TensorInputs, register
from vlmerge.merge.methods.parts import dense_unscaled_endpoint, task_vector_merge, uniforms
from vlmerge.merge.methods.parts import della as magprune

COMMON = dict(density=Param(0.5, 0, 1), epsilon=Param(0.15, 0, 0.5), lam=1.0,
              rescale=Param(True, choices=(True, False)), seed=SEED)


def check_epsilon(method: str):
    """A `prepare` that checks density ± ε in (0, 1) before any work (it prepares nothing)."""
    def check(inputs: Iterable[TensorInputs], params: dict) -> dict:
        d, eps = params["density"], params["epsilon"]
        if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
            raise VlmergeError(f"method {method}: density={d:g} ± epsilon={eps:g} must lie in (0, 1)")
        return {}
    return check


def pruner(x: TensorInputs, density: float, epsilon: float, rescale: bool, seed: int):
    def sparsify(tau: torch.Tensor, role: str) -> torch.Tensor:
        return magprune(tau, density, epsilon, uniforms(tau.shape, seed, role, x.name, tau.device), rescale)
    return sparsify


@register("della", needs_base=True, prepare=check_epsilon("della"), same_as=dense_unscaled_endpoint,
          normalize=Param(True, choices=(True, False)), **COMMON)
def della(x: TensorInputs, alpha: float, density: float, epsilon: float, lam: float, rescale: bool, seed: int,
          normalize: bool) -> torch.Tensor:
    return task_vector_merge(x, alpha, pruner(x, density, epsilon, rescale, seed), consensus=True,
                             normalize=normalize, lam=lam)


@register("della_linear", needs_base=True, prepare=check_epsilon("della_linear"), same_as=dense_unscaled_endpoint,
          **COMMON)
def della_linear(x: TensorInputs, alpha: float, density: float, epsilon: float, lam: float, rescale: bool,
                 seed: int) -> torch.Tensor:
    return task_vector_merge(x, alpha, pruner(x, density, epsilon, rescale, seed), consensus=False,
                             normalize=False, lam=lam)
