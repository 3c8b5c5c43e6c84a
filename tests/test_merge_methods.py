"""The merge methods added beside linear/slerp/task arithmetic/TIES/DARE/RegMean: their endpoints,
identical inputs, small examples computed by hand, and the reproducibility of the random ones."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from vlmerge.errors import VlmergeError
from vlmerge.merge.methods import TensorInputs, get_method
from vlmerge.merge.methods.parts import breadcrumbs as crumbs
from vlmerge.merge.methods.parts import della_probabilities, magnitude, random_drop, uniforms

def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


NEW = ["dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp",
       "karcher", "sce", "magmax", "tsv", "iso_c"]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def inputs(text, mm, base=None, name="w") -> TensorInputs:
    as_t = lambda v: v if isinstance(v, torch.Tensor) else T(v)  # noqa: E731
    return TensorInputs.twins(name, as_t(text), as_t(mm), None if base is None else as_t(base))


def merge(method: str, x: TensorInputs, alpha, **params) -> torch.Tensor:
    m = get_method(method)
    full = m.params(params)
    if m.prepare:
        full |= m.prepare([x], full)
    return m.merge(x, alpha, full)


def computed(method: str, x: TensorInputs, alpha, **params) -> torch.Tensor:
    """The method's maths itself, without the copy of an input that `same_as` makes."""
    m = get_method(method)
    full = m.params(params)
    if m.prepare:
        full |= m.prepare([x], full)
    return m.fn(x, alpha, **full)


def trio(seed: int, shape=(6, 5)) -> TensorInputs:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)
    text, mm = (base + 0.3 * (shared + torch.randn(shape, generator=g)) for _ in range(2))
    return TensorInputs.twins("layers.0.w", text, mm, base)


# -- endpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, params", [
    ("nuslerp", {}), ("karcher", {}), ("magmax", {}), ("ties", {"density": 1.0}), ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0}), ("breadcrumbs", {"density": 1.0}), ("breadcrumbs_ties", {"density": 1.0}),
    ("della", {"density": 1.0}), ("della_linear", {"density": 1.0}),
])
def test_endpoints_that_are_the_inputs_are_copied_and_the_maths_agrees(method, params):
    m, x = get_method(method), trio(0)
    full = m.params(params)
    assert m.merge(x, 1.0, full) is x.text and m.merge(x, 0.0, full) is x.mm
    assert m.copies(0.5, full) is None
    # what the maths gives there, computed: the input up to float32 rounding
    assert torch.allclose(computed(method, x, 1.0, **params), x.text, atol=1e-5)
    assert torch.allclose(computed(method, x, 0.0, **params), x.mm, atol=1e-5)
    if method == "nuslerp":  # without a base: the weights slerped, same endpoints
        nobase = TensorInputs.twins("w", x.text, x.mm)
        assert torch.allclose(computed(method, nobase, 1.0), x.text, atol=1e-6)


@pytest.mark.parametrize("method, params", [
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.5}), ("della", {"density": 0.5}), ("della_linear", {"density": 0.5}),
    ("magmax", {"lam": 2.0}), ("tsv", {}), ("iso_c", {}), ("ties", {"density": 0.5}),
])
def test_transforming_methods_at_an_endpoint_ignore_the_other_model(method, params):
    a, b = trio(1), trio(2)
    m = get_method(method)
    full = m.params(params)
    assert m.copies(1.0, full) is None
    swap_mm = TensorInputs.twins(a.name, a.text, b.mm, a.base)
    swap_text = TensorInputs.twins(a.name, b.text, a.mm, a.base)
    assert torch.equal(merge(method, a, 1.0, **params), merge(method, swap_mm, 1.0, **params))
    assert torch.equal(merge(method, a, 0.0, **params), merge(method, swap_text, 0.0, **params))
    assert not torch.allclose(merge(method, a, 1.0, **params), a.text, atol=1e-3)


def test_the_sparsified_endpoints_are_the_base_plus_the_sparsified_task_vector():
    x = trio(3, shape=(40, 30))
    tau = x.text - x.base
    assert torch.equal(merge("breadcrumbs", x, 1.0, density=0.6, gamma=0.05), x.base + crumbs(tau, 0.6, 0.05, False))
    assert torch.equal(merge("ties", x, 1.0, density=0.3), x.base + magnitude(tau, 0.3))
    u = uniforms(tau.shape, 4, "text", x.name, "cpu")
    assert torch.equal(merge("dare_linear", x, 1.0, density=0.7, seed=4), x.base + random_drop(tau, 0.7, u, True))
    assert torch.allclose(merge("magmax", x, 1.0, lam=2.0), x.base + 2 * tau)


def test_tsv_and_iso_c_endpoints_are_a_low_rank_and_a_flat_spectrum_version_of_the_task_vector():
    x = trio(4, shape=(8, 6))
    tau = x.text - x.base
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    rank3 = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]  # k = ⌊6/2⌋
    assert torch.allclose(merge("tsv", x, 1.0) - x.base, rank3, atol=1e-5)
    iso = merge("iso_c", x, 1.0, lam=2.0) - x.base
    assert torch.allclose(torch.linalg.svdvals(iso), torch.full((6,), 2 * s.mean().item()), atol=1e-5)
    assert torch.allclose(iso, 2 * s.mean() * u @ vh, atol=1e-5)
    # 1-D tensors: task arithmetic, θ₀ + 2·(¼·[1, 1] + ¾·[3, 4])
    v = inputs([1.0, 2.0], [3.0, 5.0], [0.0, 1.0])
    assert merge("tsv", v, 0.25, lam=2.0).tolist() == merge("iso_c", v, 0.25, lam=2.0).tolist() == [5.0, 7.5]


@pytest.mark.parametrize("method", ["model_stock", "sce"])
def test_methods_without_alpha_ignore_it(method):
    m, x = get_method(method), trio(5)
    assert not m.takes_alpha
    assert torch.equal(merge(method, x, None), merge(method, x, 0.9))


# -- identical inputs: text == mm == θ -----------------------------------------------------------

def same(seed: int = 6, shape=(6, 5)) -> tuple[TensorInputs, torch.Tensor]:
    x = trio(seed, shape)
    return TensorInputs.twins(x.name, x.text, x.text.clone(), x.base), x.text - x.base


@pytest.mark.parametrize("method, params", [
    ("model_stock", {}), ("model_stock", {"filter_wise": True}), ("nuslerp", {}), ("nuslerp", {"flatten": False}),
    ("karcher", {}), ("sce", {}), ("ties", {"density": 1.0}), ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0}), ("della", {"density": 1.0}), ("breadcrumbs_ties", {"density": 1.0}),
])
def test_identical_inputs_give_them_back(method, params):
    x, _ = same()
    for alpha in (0.3, 0.5):
        assert torch.allclose(merge(method, x, alpha, **params), x.text, atol=1e-5), alpha


def test_identical_inputs_where_the_maths_gives_something_else():
    x, tau = same(7, shape=(8, 6))
    # the sparsifiers are deterministic, so both task vectors are sparsified alike
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        assert torch.allclose(merge(method, x, 0.3, density=0.5), x.base + crumbs(tau, 0.5, 0.01, False), atol=1e-6)
    assert torch.allclose(merge("ties", x, 0.3, density=0.5), x.base + magnitude(tau, 0.5), atol=1e-6)
    # MagMax picks the larger weighted copy: max(α, 1−α)·τ
    assert torch.allclose(merge("magmax", x, 0.3), x.base + 0.7 * tau, atol=1e-6)
    # SCE with select_topk < 1: the variance is 0 everywhere, nothing is selected
    assert torch.equal(merge("sce", x, None, select_topk=0.5), x.base)
    # TSV: [U|U] orthogonalised halves both copies, whatever α: ½ of the rank-3 approximation
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    for alpha in (0.3, 0.5):
        assert torch.allclose(merge("tsv", x, alpha), x.base + 0.5 * u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5)
    # ISO-C: the common task vector with a flat spectrum
    assert torch.allclose(merge("iso_c", x, 0.3), x.base + s.mean() * u @ vh, atol=1e-5)
    # the random methods drop different entries of each copy (their own draws): θ only on average
    a = merge("dare_linear", x, 0.5, density=0.5, rescale=False)
    keep = [uniforms(tau.shape, 0, r, x.name, "cpu") < 0.5 for r in ("text", "mm")]
    assert torch.allclose(a, x.base + tau * (0.5 * keep[0] + 0.5 * keep[1]), atol=1e-6)


# -- small examples by hand ----------------------------------------------------------------------

def test_the_draw_is_the_seeded_per_input_per_tensor_stream():
    # the uniforms the hand examples below use (seed 0, tensor "w"); kept where u < p
    assert torch.allclose(uniforms((4,), 0, "text", "w", "cpu"), T([0.5261, 0.7241, 0.0968, 0.3508]), atol=1e-4)
    assert torch.allclose(uniforms((4,), 0, "mm", "w", "cpu"), T([0.2068, 0.3320, 0.5575, 0.9230]), atol=1e-4)


def test_dare_linear_by_hand():
    # density ½: text keeps entries 2, 3 (u < ½), mm entries 0, 1; rescale: ×‖τ‖₁/‖kept‖₁ = 10/7 each
    x = inputs([1, 2, 3, 4], [4, 3, 2, 1], [0, 0, 0, 0])
    assert torch.allclose(merge("dare_linear", x, 1.0), T([0, 0, 30 / 7, 40 / 7]))
    assert torch.allclose(merge("dare_linear", x, 0.5), T([20 / 7, 15 / 7, 15 / 7, 20 / 7]))
    assert merge("dare_linear", x, 1.0, rescale=False).tolist() == [0, 0, 3, 4]
    assert torch.allclose(merge("dare_linear", x, 1.0, lam=0.5), T([0, 0, 15 / 7, 20 / 7]))


def test_dare_ties_elects_signs_with_plus_on_a_tie_and_normalizes_only_when_asked():
    # density 1 (no drop), α = ½: weighted τ_text [.5, 1, 1.5, 2], τ_mm [-2, 1.5, -1, -.5];
    # sum [-1.5, 2.5, .5, 1.5] -> signs [-, +, +, +]; agreeing: mm | both | text | text
    x = inputs([1, 2, 3, 4], [-4, 3, -2, -1], [0, 0, 0, 0])
    assert merge("dare_ties", x, 0.5, density=1.0).tolist() == [-2, 2.5, 1.5, 2]
    assert merge("dare_ties", x, 0.5, density=1.0, normalize=True).tolist() == [-4, 2.5, 3, 4]
    # a zero sum elects +: the positive entry alone, over its weight
    tie = inputs([3], [-1], [1])  # τ = 2, -2
    assert merge("dare_ties", tie, 0.5, density=1.0, normalize=True).tolist() == [3.0]


def test_breadcrumbs_by_hand():
    # 10 entries, density ½, γ = 0.1: drop the 1 largest magnitude (-5) and the 4 smallest; keep 5
    tau = [0.1, -5, 2, -0.5, 1, 3, -4, 0.2, 0.3, 0.05]
    x = inputs(tau, [0.0] * 10, [0.0] * 10)
    kept = [0, 0, 2, -0.5, 1, 3, -4, 0, 0, 0]
    assert merge("breadcrumbs", x, 1.0, density=0.5, gamma=0.1).tolist() == kept
    scale = sum(map(abs, tau)) / 10.5
    assert torch.allclose(merge("breadcrumbs", x, 1.0, density=0.5, gamma=0.1, rescale=True), T(kept) * scale)
    # density + γ > 1: fewer outliers go, the density is kept: 9 entries, so only the largest goes
    assert torch.equal(merge("breadcrumbs", x, 1.0, density=0.95, gamma=0.2),
                       T([0.1, 0, 2, -0.5, 1, 3, -4, 0.2, 0.3, 0.05]))


def test_breadcrumbs_ties_by_hand():
    # density 2/3, γ = 1/3 on 3 entries: keep each vector's 2 smallest... n_top 1, n_bot 0: the 2 smallest magnitudes
    x = inputs([1, -2, 3], [-3, 1, 2], [0, 0, 0])
    # text keeps [1, -2, 0], mm [0, 1, 2]; α = ½: weighted sums [.5, -.5, 1] -> [+, -, +]
    assert merge("breadcrumbs", x, 0.5, density=2 / 3, gamma=1 / 3).tolist() == [0.5, -0.5, 1.0]
    assert merge("breadcrumbs_ties", x, 0.5, density=2 / 3, gamma=1 / 3).tolist() == [0.5, -1.0, 1.0]
    assert merge("breadcrumbs_ties", x, 0.5, density=2 / 3, gamma=1 / 3, normalize=True).tolist() == [1.0, -2.0, 2.0]


def test_della_probabilities_and_merge_by_hand():
    # ranks by magnitude in the row: 0.1 -> 1, -3 -> 4, 2 -> 3, 0.5 -> 2; p = (d − ε) + 2ε·(rank − 1)/3
    tau = T([0.1, -3, 2, 0.5])
    assert torch.allclose(della_probabilities(tau, 0.5, 0.2), T([[0.3, 0.7, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3]]))
    rows = T([[1.0, -2.0], [4.0, 3.0]])  # per row: the smaller magnitude d − ε, the larger d + ε
    assert torch.allclose(della_probabilities(rows, 0.5, 0.1), T([[0.4, 0.6], [0.6, 0.4]]))
    # u (text) = [.526, .724, .097, .351] < p = [.3, .7, .567, .433]: entries 2, 3 kept; ×5.6/2.5
    x = inputs(tau, [0, 0, 0, 0], [0, 0, 0, 0])
    assert torch.allclose(merge("della_linear", x, 1.0, density=0.5, epsilon=0.2), T([0, 0, 4.48, 1.12]))
    assert torch.allclose(merge("della", x, 1.0, density=0.5, epsilon=0.2, rescale=False), T([0, 0, 2, 0.5]))
    with pytest.raises(VlmergeError, match="method della: density=0.9 ± epsilon=0.15 must lie in \\(0, 1\\)"):
        merge("della", x, 0.5, density=0.9)


def test_model_stock_by_hand():
    # τ_text = [1, 0], τ_mm = [½, √3/2]: cos = ½, t = 2·½/(1 + ½) = ⅔; θ = ⅔·(θ_text + θ_mm)/2 + ⅓·θ₀
    x = inputs([2, 1], [1.5, 1 + math.sqrt(3) / 2], [1, 1])
    expected = T([2 / 3 * 1.75 + 1 / 3, 2 / 3 * (1 + math.sqrt(3) / 4) + 1 / 3])
    assert torch.allclose(merge("model_stock", x, None), expected)
    # filter-wise: each row its own angle; row 1 (τ equal) -> t = 1; row 0 (orthogonal) -> t = 0, θ₀
    rows = inputs([[2, 1], [3, 3]], [[1, 2], [3, 3]], [[1, 1], [1, 1]])
    assert merge("model_stock", rows, None, filter_wise=True).tolist() == [[1, 1], [3, 3]]
    # opposite task vectors: 1 + cos = 0, θ₀
    assert merge("model_stock", inputs([2, 1], [0, 1], [1, 1]), None).tolist() == [1, 1]


def test_nuslerp_by_hand():
    s = math.sqrt(0.5)
    # orthogonal task vectors, α = ½ (t = ½): θ₀ + (sin(π/4)·τ_text + sin(π/4)·τ_mm)/sin(π/2)
    x = inputs([2, 1], [1, 2], [1, 1])
    assert torch.allclose(merge("nuslerp", x, 0.5), T([1 + s, 1 + s]))
    # α = ¼: t = ¾, the point at ¾ of the right angle from τ_text
    assert torch.allclose(merge("nuslerp", x, 0.25), T([1 + math.sin(math.pi / 8), 1 + math.sin(3 * math.pi / 8)]))
    # without a base: the weights themselves, their norms kept in the sines
    assert torch.allclose(merge("nuslerp", inputs([1, 0], [0, 2]), 0.5), T([s, 2 * s]))
    # per row (flatten off): row 0 orthogonal, row 1 parallel (lerp)
    rows = inputs([[1, 0], [1, 1]], [[0, 1], [3, 3]])
    assert torch.allclose(merge("nuslerp", rows, 0.5, flatten=False), T([[s, s], [2, 2]]))


def test_karcher_by_hand():
    # e1 and 2·e2: the weighted mean direction at (1−α)·90° from e1, the norm α·1 + (1−α)·2
    x = inputs([1, 0], [0, 2])
    assert torch.allclose(merge("karcher", x, 0.5), 1.5 * T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    a = 3 * math.pi / 8
    assert torch.allclose(merge("karcher", x, 0.25), 1.75 * T([math.cos(a), math.sin(a)]), atol=1e-6)
    # a zero tensor takes no part in the direction; its weight still scales the norm
    assert torch.allclose(merge("karcher", inputs([0, 0], [0, 2]), 0.5), T([0, 1.0]))


def test_sce_by_hand():
    # mean squares: τ_text 6/4, τ_mm 11/4 -> weights 6/17, 11/17; signs of the sum [3, 0, 0, -2]: [+, +, +, -]
    # agreeing: both | mm | none | mm -> [(2·6 + 11)/17, 1, 0, -3]
    x = inputs([2, -1, 0, 1], [1, 1, 0, -3], [0, 0, 0, 0])
    assert torch.allclose(merge("sce", x, None), T([23 / 17, 1, 0, -3]))
    # select ½: variances [.25, 1, 0, 4], 3 nonzero -> k = 1: only the last entry; τ_mm's sign wins
    assert torch.allclose(merge("sce", x, None, select_topk=0.5), T([0, 0, 0, -3]))


def test_magmax_by_hand():
    # α = ½: weighted [1.5, -.5, 1] and [-1, 2, -1]; the larger magnitude, mm on a tie; λ = 2
    x = inputs([3, -1, 2], [-2, 4, -2], [0, 0, 0])
    assert merge("magmax", x, 0.5, lam=2.0).tolist() == [3, 4, -2]
    # α = ¼: τ_text [4, -1, 0] -> [1, -.25, 0]; τ_mm [-1, 2, .5] -> [-.75, 1.5, .375]
    assert merge("magmax", inputs([5, 0, 1], [0, 3, 1.5], [1, 1, 1]), 0.25).tolist() == [2, 2.5, 1.375]


def test_tsv_by_hand():
    # 2×2, k = 1: α·τ_text = diag(1.5, .5) keeps (e1, 1.5, e1); (1−α)·τ_mm keeps (e2, 1, e2):
    # [e1 | e2] is already orthogonal -> diag(1.5, 1)
    x = inputs([[3, 0], [0, 1]], [[0, 0], [0, 2]], [[0, 0], [0, 0]])
    assert torch.allclose(merge("tsv", x, 0.5), T([[1.5, 0], [0, 1]]), atol=1e-6)
    # non-orthogonal singular vectors: U = [e1 | (e1+e2)/√2] orthogonalised, U⊥ = U (UᵀU)^(-1/2)
    y = inputs([[2, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]])
    u = T([[1, math.sqrt(0.5)], [0, math.sqrt(0.5)]])
    w, q = torch.linalg.eigh(u.T @ u)
    polar = u @ q @ torch.diag(w.rsqrt()) @ q.T
    expected = polar @ torch.diag(T([1.0, 1.0])) @ polar.T  # Σ = (½·2, ½·2); V = U here
    assert torch.allclose(merge("tsv", y, 0.5), expected, atol=1e-5)


def test_iso_c_by_hand():
    # α = ½: τ = [[0, 3], [1, 0]], singular values 3, 1 -> mean 2; U Vᵀ = [[0, 1], [1, 0]]
    x = inputs([[1, 5], [1, 1]], [[1, 3], [3, 1]], [[1, 1], [1, 1]])  # τ_text [[0, 4], [0, 0]], τ_mm [[0, 2], [2, 0]]
    assert torch.allclose(merge("iso_c", x, 0.5), T([[1, 3], [3, 1]]), atol=1e-6)
    assert torch.allclose(merge("iso_c", x, 0.5, lam=0.5), T([[1, 2], [2, 1]]), atol=1e-6)


# -- reproducibility of the random methods -------------------------------------------------------

@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_reproducible_per_tensor_whatever_the_order(method):
    a = trio(8, shape=(30, 20))
    b = TensorInputs.twins("layers.1.w", a.text.flip(0), a.mm.flip(0), a.base.flip(0))
    m = get_method(method)
    full = m.params({"density": 0.5, "seed": 3})
    first = [m.merge(x, 0.3, full) for x in (a, b)]
    second = [m.merge(x, 0.3, full) for x in (b, a)][::-1]
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert not torch.equal(first[0], m.merge(a, 0.3, m.params({"density": 0.5, "seed": 4})))
    renamed = TensorInputs.twins("layers.2.w", a.text, a.mm, a.base)  # another tensor: another draw
    assert not torch.equal(first[0], m.merge(renamed, 0.3, full))


def test_a_parameter_of_a_new_method_out_of_range_is_refused():
    with pytest.raises(VlmergeError, match="method breadcrumbs: parameter gamma=2: expected a value in \\[0, 1\\]"):
        get_method("breadcrumbs").params({"gamma": 2})
    with pytest.raises(VlmergeError, match="method nuslerp: parameter flatten='yes': expected one of True, False"):
        get_method("nuslerp").params({"flatten": "yes"})


# -- on model directories: every new method streamed to disk equals the sweep's in-memory merge ---

def test_new_methods_merge_to_disk_as_in_memory(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from test_merge import tiny_llama
    from vlmerge.merge.core import Pair, PairMerger, merge_to_disk

    text, mm, base = (tiny_llama(tmp_path / n, s) for n, s in (("text", 1), ("mm", 2), ("base", 3)))
    merger = PairMerger(Pair.open(text, mm, base))
    model = LlamaForCausalLM.from_pretrained(text)
    for method in NEW:
        alpha = 0.3 if get_method(method).takes_alpha else None
        merger.merge_into(model, method, alpha)
        disk = load_file(merge_to_disk(text, mm, tmp_path / method, method, [alpha], base=base)[0] / "model.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[k], disk[k]) for k in disk), method
        assert all(torch.isfinite(v).all() for v in disk.values()), method


# -- against mergekit, on small tensors (the full-size figure: tests/bench/bench_method_parity.py) --

PEERS = Path(os.environ.get("PEERS_VENV", Path(__file__).resolve().parents[1] / ".venv-peers"))


@pytest.mark.skipif(not (PEERS / "bin" / "python").is_file(), reason="no peer venv with mergekit (make peers)")
def test_small_tensors_agree_with_mergekit(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    import bench_method_parity as bench

    results = bench.small_parity(tmp_path, PEERS / "bin" / "python")
    assert results and max(results.values()) <= 1e-6, results
