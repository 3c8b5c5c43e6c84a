"""Fisher merging (Matena & Raffel 2022): each entry a mean of the twins weighted by α, 1−α and by
each twin's diagonal Fisher on its own data, as FusionBench computes it:

    θ = Σᵢ wᵢ F̂ᵢ θᵢ / Σᵢ wᵢ F̂ᵢ,   F̂ᵢ = Fᵢ / ‖Fᵢ‖ + floor   (normalize)   or   Fᵢ + floor

‖Fᵢ‖ is the norm of twin i's Fisher over the whole model, so that a twin whose data give larger
gradients everywhere does not outweigh the other by its scale alone; the floor keeps entries no
data reached (unused embedding rows) a plain weighted mean. Tensors without a Fisher (buffers)
are interpolated linearly. α = 1 and 0 give the text and the multimodal model.
"""

from collections.abc import Iterable

import torch

from vlmerge.merge.methods import Param, TensorInputs, endpoint, register


def fisher_norms(inputs: Iterable[TensorInputs], params: dict) -> dict:
    """With normalize, each twin's Fisher norm over every tensor of the model."""
    if not params["normalize"]:
        return {}
    squares = {"text": 0.0, "mm": 0.0}
    for x in inputs:
        for role, f in x.statistics.get("fisher", {}).items():
            squares[role] += float(f.double().square().sum())
    return {"norms": {role: max(s, 1e-300) ** 0.5 for role, s in squares.items()}}


@register("fisher", statistics=("fisher",), prepare=fisher_norms, same_as=endpoint,
          normalize=Param(True, choices=(True, False)), floor=Param(1e-6, 1e-12, None))  # > 0: no 0/0 where no data reached
def fisher(x: TensorInputs, alpha: float, normalize: bool, floor: float,
           norms: dict[str, float] | None = None) -> torch.Tensor:
    f = x.statistics.get("fisher")
    if f is None:
        return torch.lerp(x.mm, x.text, alpha)
    scale = norms or {"text": 1.0, "mm": 1.0}
    w_text = alpha * (f["text"].double() / scale["text"] + floor)
    w_mm = (1 - alpha) * (f["mm"].double() / scale["mm"] + floor)
    return ((w_text * x.text.double() + w_mm * x.mm.double()) / (w_text + w_mm)).to(x.text.dtype)
