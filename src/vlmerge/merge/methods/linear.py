"""Linear interpolation: θ = α·θ_text + (1−α)·θ_mm."""

import torch

from vlmerge.merge.methods import TensorInputs, register


def endpoint(alpha: float, params: dict) -> str | None:
    """α = 1 is the text model and α = 0 the multimodal one, bitwise (see `linear`)."""
    return {1.0: "text", 0.0: "mm"}.get(alpha)


@register("linear", same_as=endpoint, takes_out=True)
def linear(x: TensorInputs, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    # The endpoints are the inputs themselves, bitwise (lerp at α = 0 would turn a -0.0 of θ_mm
    # into +0.0 where θ_text is positive).
    role = endpoint(alpha, {})
    if role:
        same = getattr(x, role)
        return same.clone() if out is None else out.copy_(same)
    return torch.lerp(x.mm, x.text, alpha, out=out)
