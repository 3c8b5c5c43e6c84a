"""Model Stock (Jang et al. 2024), as mergekit's `model_stock`, for two fine-tuned models:

    θ = t·(θ_text + θ_mm)/2 + (1 − t)·θ₀,   t = 2·cos/(1 + cos),   cos = cos(τ_text, τ_mm)

over the whole tensor, or per row with filter_wise (a 1-D tensor is one row). Where 1 + cos is
~0 (|1 + cos| < 1e-6), t = 0 (θ₀). No α (takes_alpha=False: the weights come from the angle).
Identical task vectors (cos = 1) give t = 1, their common model; orthogonal ones give θ₀.
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, register


@register("model_stock", takes_alpha=False, needs_base=True, filter_wise=Param(False, choices=(False, True)))
def model_stock(x: TensorInputs, alpha: None, filter_wise: bool) -> torch.Tensor:
    w0, ws = x.base, [x.text, x.mm]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    a, b = (w - w0 for w in ws)
    norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
    cos = ((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1).unsqueeze(-1)  # one pair: no mean over pairs
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(x.base.shape)
