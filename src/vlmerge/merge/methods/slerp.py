"""Spherical interpolation per tensor from θ_mm (α = 0) to θ_text (α = 1); lerp when nearly parallel."""

import math

import torch

from vlmerge.merge.methods import Param, TensorInputs, endpoint, register


@register("slerp", same_as=endpoint, eps=Param(1e-6, 0, 1, low_open=True))
def slerp(x: TensorInputs, alpha: float, eps: float) -> torch.Tensor:
    a, b = x.mm.double().flatten(), x.text.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.lerp(x.mm, x.text, alpha)
    cos = torch.clamp(a @ b / (na * nb), -1.0, 1.0).item()
    if abs(cos) > 1 - eps:  # (anti)parallel: the sphere's arc is a line
        return torch.lerp(x.mm, x.text, alpha)
    omega = math.acos(cos)
    wa, wb = math.sin((1 - alpha) * omega) / math.sin(omega), math.sin(alpha * omega) / math.sin(omega)
    return (wa * a + wb * b).reshape(x.mm.shape).to(x.mm.dtype)
