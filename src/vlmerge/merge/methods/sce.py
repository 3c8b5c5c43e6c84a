"""SCE (Select, Calculate, Erase; Wan et al. 2024, FuseChat), as mergekit's `sce`:

    Select:    with select_topk < 1, keep only the ⌊select_topk·(nonzero)⌋ entries where the
               variance of (τ_text, τ_mm) is largest (in both task vectors)
    Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)   (uniform where Σ is ~0)
    Erase:     mᵢ: whether τᵢ has the sign of τ_text + τ_mm (+ where it is 0)
    θ = θ₀ + Σᵢ mᵢ·wᵢ·τᵢ / max(Σᵢ mᵢ·wᵢ, 1e-6)

No α (takes_alpha=False: the weights come from the task vectors, as in mergekit, where `sce`
takes no weights). Identical task vectors give their common model (with select_topk < 1, θ₀:
their variance is 0 everywhere, so nothing is selected).
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, register
from vlmerge.merge.methods.parts import sce_select, sce_weights, sign_agreement


@register("sce", takes_alpha=False, needs_base=True, select_topk=Param(1.0, 0, 1))
def sce(x: TensorInputs, alpha: None, select_topk: float) -> torch.Tensor:
    taus = torch.stack(x.task_vectors())
    if select_topk < 1:
        taus = taus * sce_select(taus, select_topk).unsqueeze(0)
    erase = sign_agreement(taus)
    weights = sce_weights(taus).view(-1, *([1] * (taus.dim() - 1)))
    kept = weights * erase
    return x.base + (taus * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
