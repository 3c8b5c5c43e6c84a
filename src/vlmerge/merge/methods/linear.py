"""Linear interpolation: θ = α·θ_text + (1−α)·θ_mm."""

import torch

from vlmerge.merge.methods import TensorInputs, endpoint, register


# At α = 1 and 0 the inputs themselves (`endpoint`): lerp at α = 0 would turn a -0.0 of θ_mm
# into +0.0 where θ_text is positive.
@register("linear", same_as=endpoint)
def linear(x: TensorInputs, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.lerp(x.mm, x.text, alpha, out=out)
