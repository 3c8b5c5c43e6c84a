"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), as FusionBench's
`compute_and_sum_svd_mem_reduction`, per 2-D tensor of the weighted task vectors
τ'₁ = α·τ_text, τ'₂ = (1−α)·τ_mm (FusionBench's per-task alpha list) with T = 2:

    τ'ᵢ = Uᵢ Σᵢ Vᵢᵀ;  keep each one's top k = ⌊r/T⌋ singular triplets (r = min of the shape);
    U = [U₁,ₖ | U₂,ₖ], Σ = diag(Σ₁,ₖ, Σ₂,ₖ), Vᵀ = [V₁,ₖ | V₂,ₖ]ᵀ (zero-padded to r if r is odd);
    U⊥ = P Qᵀ from U = P S Qᵀ (the orthogonal polar factor), the same for Vᵀ;
    θ = θ₀ + λ·U⊥ Σ V⊥ᵀ

in float32 as FusionBench. Where U (or Vᵀ) is rank-deficient its polar factor is not unique, and
FusionBench's P Qᵀ brings in an arbitrary basis of the null space; here it is the partial isometry
on U's range (P and Q cut to the numerical rank: singular values above max(shape)·eps·the
largest), the same wherever U has full rank. So a zero weighted task vector (a zero weight, or
an input equal to the base there), which has no singular vectors, leaves its block zero, and
identical task vectors give a defined result. Other tensors (1-D): task arithmetic
θ₀ + λ·(α·τ_text + (1−α)·τ_mm) (FusionBench takes the mean of the τ'ᵢ, half of that).

α = 1 (0): θ₀ + λ·(τ_text's (τ_mm's) best rank-k approximation) on 2-D tensors, the task
arithmetic endpoint elsewhere. Identical task vectors τ: θ₀ + λ·½·(τ's rank-k approximation)
(the orthogonalisation of [U | U] halves each copy).
"""

import torch

from vlmerge.merge.methods import TensorInputs, register

TASKS = 2


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """FusionBench's TSV-M on 2-D task vectors (already weighted)."""
    m, n = taus[0].shape
    r = min(m, n)
    k = int(r * (1 / len(taus)))
    sum_u, sum_s, sum_vh = taus[0].new_zeros(m, r), taus[0].new_zeros(r), taus[0].new_zeros(r, n)
    for i, tau in enumerate(taus):
        if not torch.any(tau):
            continue
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k, :] = vh[:k, :]
    return torch.linalg.multi_dot((orthogonal_factor(sum_u), torch.diag(sum_s), orthogonal_factor(sum_vh)))


def orthogonal_factor(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from a = P S Qᵀ, with P and Q cut to a's numerical rank (0 for a zero matrix)."""
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    rank = int((s > s.max() * max(a.shape) * torch.finfo(a.dtype).eps).sum()) if s.max() > 0 else 0
    return p[:, :rank] @ qh[:rank]


@register("tsv", needs_base=True, lam=1.0)
def tsv(x: TensorInputs, alpha: float, lam: float) -> torch.Tensor:
    tau_text, tau_mm = x.task_vectors()
    if tau_text.dim() != 2:
        return x.base + lam * (alpha * tau_text + (1 - alpha) * tau_mm)
    return x.base + lam * tsv_merge([alpha * tau_text, (1 - alpha) * tau_mm])
