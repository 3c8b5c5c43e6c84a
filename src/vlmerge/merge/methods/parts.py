"""Parts of the task-vector merges, which compose them as mergekit does (its `sparsify.py` and
`generalized_task_arithmetic.py`, followed operation by operation so that the results agree
to float32 rounding): a sparsification of each task vector τ = θ − θ₀ alone, then a consensus
(which entries agree) and a combination, in `task_vector_merge`.

No method is registered here. Random parts compare uniforms drawn on a CPU generator seeded by
(seed, role, tensor name) with each entry's keep probability (kept where u < p, as a Bernoulli
draw): a merge is reproducible, the same on a GPU as on the CPU, and does not depend on the
order of the tensors.

Where a rule ranks entries by magnitude (top-k, breadcrumbs, SCE's variance), entries of equal
magnitude at the cut are chosen as torch's sort orders them, which is what mergekit does; the
common case, no tie at the cut, needs no sort (`ranked`).
"""

import zlib
from collections.abc import Callable, Sequence

import torch

from vlmerge.merge.methods import TensorInputs, endpoint

ROLES = ("text", "mm")  # the order of the inputs, as mergekit's models list: text (weight α), mm (1 − α)


def generator(seed: int, role: str, name: str) -> torch.Generator:
    """A CPU generator of its own for each (seed, input role, tensor)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{role}:{name}".encode()))


def uniforms(shape: Sequence[int], seed: int, role: str, name: str, device: torch.device) -> torch.Tensor:
    """Float32 uniforms in [0, 1) for one input's tensor, drawn on the host, then moved to `device`."""
    return torch.rand(tuple(shape), generator=generator(seed, role, name)).to(device)


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


def rescaled(tau: torch.Tensor, keep: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """τ where kept (else 0); with `rescale`, times ‖τ‖₁/‖kept τ‖₁ (mergekit's L1 rescaling, its
    `rescale: true`), unless either norm is below `eps`."""
    masked = tau * keep
    if not rescale:
        return masked
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


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


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the ⌊γ·n⌋ largest magnitudes (outliers) and the smallest, keeping
    ⌊density·n⌋ entries; fewer outliers go when both do not fit (mergekit's `magnitude_outliers`)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rescaled(tau, ranked(tau.abs().flatten(), n_bot, n_bot + target).view(tau.shape), rescale)


def random_drop(tau: torch.Tensor, density: float, u: torch.Tensor, rescale: bool) -> torch.Tensor:
    """DARE as mergekit's `dare_*`: keep each entry with probability `density` (u < density),
    then the L1 rescaling (not DARE's 1/density, see `dare.py` for that)."""
    if density >= 1:
        return tau
    keep = u.view(tau.shape) < torch.tensor(density, dtype=tau.dtype, device=tau.device)
    return rescaled(tau, keep, rescale)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities per row (a 1-D tensor is one row): linear in the
    magnitude's rank within the row, from density − ε (smallest) to density + ε (largest).
    A row of one entry: density. Shape: τ as 2-D (or more) rows."""
    rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    # 1-based ranks: the inverse permutation of the sort (mergekit's order.argsort(dim=1) + 1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .view(1, -1, *([1] * (order.dim() - 2))).expand_as(order))
    ranks = ranks.to(rows.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    if rows.shape[1] == 1:
        rank_norm = torch.full_like(rank_norm, 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della(tau: torch.Tensor, density: float, epsilon: float, u: torch.Tensor, rescale: bool) -> torch.Tensor:
    """DELLA's MagPrune (mergekit's `della_magprune`): keep each entry with its rank's probability,
    then the L1 rescaling (mergekit's; the paper rescales each kept entry by 1/p)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    probs = della_probabilities(tau, density, epsilon)
    rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
    return rescaled(rows, u.view(probs.shape) < probs, rescale).reshape(tau.shape)


def sce_select(taus: torch.Tensor, share: float) -> torch.Tensor:
    """SCE's Select: a 0/1 mask of the ⌊share·(nonzero variances)⌋ entries whose variance over the
    task vectors (stacked on dim 0) is largest (mergekit's `sce_mask`)."""
    if share <= 0:
        return torch.zeros_like(taus[0])
    if share >= 1:
        return torch.ones_like(taus[0])
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)  # a float32 product, as mergekit's
    if k == 0:
        return torch.zeros_like(var)
    flat = var.abs().view(-1)
    top = ranked(flat, 0, k, descending=True, chosen=lambda: torch.topk(flat, k=k, largest=True).indices)
    return top.view(var.shape).to(var.dtype)


def sce_weights(taus: torch.Tensor) -> torch.Tensor:
    """SCE's Calculate: each task vector's mean square over their sum (uniform if that is ~0)."""
    weights = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


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
