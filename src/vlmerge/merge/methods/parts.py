"""Parts of the task-vector merges, which compose them as mergekit does (its `sparsify.py` and
`generalized_task_arithmetic.py`, followed operation by operation so that the results agree
to float32 rounding): a sparsification of each task vector τ = θ − θ₀ alone, then a consensus
(which entries agree) and a combination, in `task_vector_merge`.

No method is registered here. Random draws come from a CPU generator seeded by (seed, role,
tensor name): a merge is reproducible, the same on a GPU as on the CPU, and does not depend on
the order of the tensors.

Where a rule ranks entries by magnitude (TIES's top-k), entries of equal
magnitude at the cut are chosen as torch's sort orders them, which is what mergekit does; the
common case, no tie at the cut, needs no sort (`ranked`).
"""

import zlib
from collections.abc import Callable

import torch

from vlmerge.merge.methods import TensorInputs, endpoint

ROLES = ("text", "mm")  # the order of the inputs, as mergekit's models list: text (weight α), mm (1 − α)


def generator(seed: int, role: str, name: str) -> torch.Generator:
    """A CPU generator of its own for each (seed, input role, tensor)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{role}:{name}".encode()))


def ranked(values: torch.Tensor, lo: int, hi: int, descending: bool = False,
           chosen: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """A boolean mask of the entries at positions lo..hi−1 of 1-D `values` sorted ascending (or
    descending), as `torch.sort(values, descending=...).indices[lo:hi]` selects them (or the
    indices `chosen()` returns).

    Two order statistics decide the selection unless equal values straddle a cut; only then is
    the sort done, so that ties are broken as the sort breaks them."""
    n = values.numel()
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    # In ascending positions, the selection is [a, b): descending [lo, hi) is ascending [n−hi, n−lo).
    a, b = (n - hi, n - lo) if descending else (lo, hi)
    keep = torch.ones(n, dtype=torch.bool, device=values.device)
    if a > 0:  # the a-th smallest value starts the selection, and none below it is in
        v_lo = values.kthvalue(a + 1).values
        if int((values < v_lo).sum()) != a:
            return _sorted_mask(values, lo, hi, descending, chosen)
        keep &= values >= v_lo
    if b < n:  # the b-th smallest ends it
        v_hi = values.kthvalue(b).values
        if int((values <= v_hi).sum()) != b:
            return _sorted_mask(values, lo, hi, descending, chosen)
        keep &= values <= v_hi
    return keep


def _sorted_mask(values, lo, hi, descending, chosen) -> torch.Tensor:
    """`ranked` where equal values straddle a cut: the sort (or `chosen`) decides."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[chosen() if chosen else torch.sort(values, descending=descending).indices[lo:hi]] = True
    return mask


# -- sparsification: one task vector -> its sparsified (and rescaled) version ---------------------

def magnitude_threshold(values: torch.Tensor, density: float) -> float:
    """The smallest magnitude among the top max(1, ⌊density·n⌋) magnitudes (the count `magnitude`
    keeps), for one threshold over many tensors; inf for density 0."""
    flat = values.abs().flatten()
    if density <= 0 or flat.numel() == 0:
        return float("inf")
    k = min(flat.numel(), max(1, int(density * flat.numel())))
    return flat.kthvalue(flat.numel() - k + 1).values.item()


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ where its magnitude reaches `threshold`, else 0."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the max(1, ⌊density·n⌋) entries of largest magnitude (mergekit's `magnitude`)."""
    if density >= 1:
        return tau
    n = tau.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * n))
    return tau * ranked(tau.abs().flatten(), 0, k, descending=True).view(tau.shape)


# -- consensus and combination --------------------------------------------------------------------

def sign_agreement(deltas: torch.Tensor) -> torch.Tensor:
    """TIES's sign election over the (weighted) task vectors stacked on dim 0: the sign of their sum
    (+ where it is 0), and which entries have it (a zero entry agrees with neither sign)."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def task_vector_merge(x: TensorInputs, alpha: float, sparsify: Callable[[torch.Tensor, str], torch.Tensor] | None, *,
                      consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """θ₀ + λ·combine(wᵢ·sparsify(τᵢ)) with weights α (text), 1 − α (mm), as mergekit's generalized
    task arithmetic: with `consensus`, only the entries that agree with the elected sign, divided
    (with `normalize`) by the weights that agree; without, the sum, divided by Σw = 1."""
    taus = x.task_vectors()
    deltas = torch.stack([sparsify(t, role) if sparsify else t for t, role in zip(taus, ROLES)])
    weights = torch.tensor([alpha, 1 - alpha], dtype=deltas.dtype, device=deltas.device)
    weights = weights.view(-1, *([1] * (deltas.dim() - 1)))
    deltas = deltas * weights
    if consensus:
        agree = sign_agreement(deltas)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return x.base + mixed


def dense_unscaled_endpoint(alpha: float, params: dict) -> str | None:
    """A task-vector merge that keeps every entry (density 1) with λ = 1 is, at α = 1 and 0,
    θ₀ + τ_text = θ_text and θ₀ + τ_mm = θ_mm: the consensus has only the one weighted input."""
    return endpoint(alpha, params) if params.get("density", 1) >= 1 and params["lam"] == 1 else None
