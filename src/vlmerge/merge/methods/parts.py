"""Parts of the task-vector merges, which compose them as mergekit does: a sparsification step
(each task vector τ = θ − θ₀ alone), then a consensus (which entries agree) and a combination.

No method is registered here. Random parts draw their uniforms on a CPU generator seeded by
(seed, role, tensor name): a merge is reproducible, the same on a GPU as on the CPU, and does
not depend on the order of the tensors.
"""

import zlib

import torch


def generator(seed: int, role: str, name: str) -> torch.Generator:
    """A CPU generator of its own for each (seed, input role, tensor)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{role}:{name}".encode()))


# -- sparsification -------------------------------------------------------------------------------

def magnitude_threshold(values: torch.Tensor, density: float) -> float:
    """The smallest magnitude among the `density` share of largest-magnitude entries."""
    flat = values.abs().flatten()
    k = int(round(density * flat.numel()))
    if k == 0:
        return float("inf")
    return flat.kthvalue(flat.numel() - k + 1).values.item()


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ where its magnitude reaches `threshold`, else 0."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


# -- consensus and combination --------------------------------------------------------------------

def disjoint_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect sign(Σ wᵢτᵢ) per entry; mean of the wᵢτᵢ that agree, over the weights that agree."""
    weighted = [w * t for w, t in zip(weights, taus)]
    sign = torch.sign(sum(weighted))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(torch.where(a, wt, torch.zeros_like(wt)) for a, wt in zip(agree, weighted))
    den = sum(a.to(num.dtype) * w for a, w in zip(agree, weights))
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))
