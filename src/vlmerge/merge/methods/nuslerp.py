"""NuSLERP, as mergekit's `nuslerp`: spherical interpolation from the text model (α = 1) to the
multimodal one (α = 0), t = (1−α)/(α + (1−α)), of

    with a base (--base):  the task vectors, θ = θ₀ + slerp(t, τ_text, τ_mm)
    without:               the weights,      θ = slerp(t, θ_text, θ_mm)

slerp(t, a, b) = (sin((1−t)ω)·a + sin(tω)·b)/sin ω, ω the angle between a and b; over the whole
tensor (flatten, the default), else per row (row_wise: along dim 0; otherwise along the last
dim); (1−t)·a + t·b where a and b are (anti)parallel (1 − cos² ≤ 1e-16).

α = 1 (0): t = 0 (1), the text (multimodal) model: θ₀ + τ_text = θ_text.
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, endpoint, register


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
                    flatten: bool = False) -> torch.Tensor:
    """mergekit's `nuslerp`, operation by operation."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


@register("nuslerp", same_as=endpoint, row_wise=Param(False, choices=(False, True)),
          flatten=Param(True, choices=(True, False)))
def nuslerp(x: TensorInputs, alpha: float, row_wise: bool, flatten: bool) -> torch.Tensor:
    weights = [alpha, 1 - alpha]  # text, mm
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if x.base is None:
        return nuslerp_tensors(t, x.text, x.mm, dim=dim, flatten=flatten)
    tau_text, tau_mm = x.task_vectors()
    return x.base + nuslerp_tensors(t, tau_text, tau_mm, dim=dim, flatten=flatten)
