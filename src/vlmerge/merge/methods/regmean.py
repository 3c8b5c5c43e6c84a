"""RegMean (Jin et al. 2023) for two models weighted α, 1−α.

For a linear layer y = x Wᵀ with Gram matrices Gᵢ = Σ xᵢᵀxᵢ of each model's inputs on its
own data: Wᵀ = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ, G̃ = γG + (1−γ)·diag(G), in float64, solved, not
inverted. γ = 0 weights each input dimension by its own activation energy; tensors without
Gram matrices (embeddings, norms, biases) are averaged linearly.
"""

import torch

from vlmerge.merge.methods import Param, TensorInputs, endpoint, register


def scaled_gram(gram: torch.Tensor, gamma: float) -> torch.Tensor:
    """G̃ = γG + (1−γ)·diag(G)."""
    return gamma * gram + (1 - gamma) * torch.diag(torch.diagonal(gram))


def regmean_weight(weights: list[torch.Tensor], grams: list[torch.Tensor], coefs: list[float], gamma: float) -> torch.Tensor:
    """The RegMean solution for linear weights [out, in] with input Gram matrices [in, in]."""
    g = [c * scaled_gram(gr.double(), gamma) for c, gr in zip(coefs, grams)]
    lhs = sum(g)
    rhs = sum(gi @ w.double().T for gi, w in zip(g, weights))
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:  # singular (e.g. dead inputs): least squares instead
        solution = torch.linalg.lstsq(lhs, rhs).solution
    return solution.T.to(weights[0].dtype).contiguous()


# At α = 1 and 0 one model has all the weight: RegMean's solution is that model's weights.
@register("regmean", statistics=("grams",), same_as=endpoint, gamma=Param(0.9, 0, 1))
def regmean(x: TensorInputs, alpha: float, gamma: float) -> torch.Tensor:
    grams = x.statistics.get("grams")
    if grams is None:
        return torch.lerp(x.mm, x.text, alpha)
    return regmean_weight([x.text, x.mm], [grams["text"], grams["mm"]], [alpha, 1 - alpha], gamma)
