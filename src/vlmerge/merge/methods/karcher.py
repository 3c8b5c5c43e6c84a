"""The weighted Karcher (Riemannian) mean on the unit sphere, as mergekit's `karcher` (its
`karcher_merge_tensors`), with weights α (text) and 1−α (mm):

    u = the point of the sphere that minimises α·d(u, θ_text/‖θ_text‖)² + (1−α)·d(u, θ_mm/‖θ_mm‖)²
        (d: the angle), by at most max_iter steps of the Riemannian gradient, until it is < tol;
    θ = (α·‖θ_text‖ + (1−α)·‖θ_mm‖)·u

A tensor of norm ≤ tol takes no part in u (its weight still scales the norm). For two tensors
the mean lies on their great circle at the angle share 1−α from θ_text: slerp with the norms
interpolated linearly. No base. α = 1 (0): the text (multimodal) model.
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, endpoint, register


def karcher_mean(tensors: list[torch.Tensor], weights: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's `karcher_merge_tensors`, operation by operation."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_weights = [weights[i] for i in valid]
    weight_sum = sum(valid_weights)
    normalized = [w / weight_sum for w in valid_weights]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for w, unit in zip(normalized, valid_units):
        mean += w * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, unit in zip(normalized, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(w * norm for w, norm in zip(weights, norms))
    return scale * mean


@register("karcher", same_as=endpoint, max_iter=Param(10, 1, 10_000), tol=Param(1e-5, 0, 1))
def karcher(x: TensorInputs, alpha: float, max_iter: int, tol: float) -> torch.Tensor:
    return karcher_mean([x.text, x.mm], [alpha, 1 - alpha], max_iter, tol)
