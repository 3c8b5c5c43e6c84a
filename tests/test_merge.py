"""Merge methods and distances against hand-computed values; streamed and in-memory merges."""

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vlmerge.cli import main
from vlmerge.errors import VlmergeError
from vlmerge.hf import quiet_transformers
from vlmerge.merge.core import Pair, PairMerger, merge_to_disk
from vlmerge.merge.distance import cosine, distances, l2, scopes_of, ssd, tssd
from vlmerge.merge.statistics.grams import compute_grams
from vlmerge.merge.io import ModelDir, SafetensorsWriter
from vlmerge.merge.methods import METHODS, TensorInputs, get_method
from vlmerge.merge.methods.regmean import regmean_weight

T = torch.tensor


def run(method: str, text, mm, alpha: float, base=None, grams=None, **params) -> torch.Tensor:
    m = get_method(method)
    x = TensorInputs.twins("w", T(text, dtype=torch.float32), T(mm, dtype=torch.float32),
                           None if base is None else T(base, dtype=torch.float32), grams and {"grams": grams})
    full = m.params(params)
    if m.prepare:
        full |= m.prepare([x], full)
    return m.merge(x, alpha, full)


def test_registry_lists_every_method():
    assert {n for n, m in METHODS.items() if m.inputs == "twins"} == {
        "linear", "task_arithmetic", "regmean", "fisher", "ties", "dare", "slerp", "dare_linear", "dare_ties", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "karcher", "sce", "magmax", "tsv", "iso_c"}
    with pytest.raises(VlmergeError, match="unknown merge method 'avg' \\(known: breadcrumbs, breadcrumbs_ties, dare"):
        get_method("avg")
    with pytest.raises(VlmergeError, match="unknown parameter 'densty' \\(allowed: density, lam, scope\\)"):
        get_method("ties").params({"densty": 0.3})


@pytest.mark.parametrize("method, params, message", [
    ("ties", {"density": 1.5}, "method ties: parameter density=1.5: expected a value in \\[0, 1\\]"),
    ("ties", {"scope": "layer"}, "method ties: parameter scope='layer': expected one of 'tensor', 'model'"),
    ("dare", {"p": 1}, "method dare: parameter p=1: expected a value in \\[0, 1\\)"),
    ("slerp", {"eps": 0}, "method slerp: parameter eps=0: expected a value in \\(0, 1\\]"),
    ("ties", {"lam": float("nan")}, "method ties: parameter lam=nan: expected a finite number"),
    ("karcher", {"max_iter": 2.5}, "method karcher: parameter max_iter=2.5: expected a whole number"),
    ("nuslerp", {"flatten": 1}, "method nuslerp: parameter flatten=1: expected one of True, False"),
    ("regmean", {"gamma": "high"}, "method regmean: parameter gamma='high': expected a number"),
])
def test_a_parameter_out_of_its_declared_range_is_refused_by_name(method, params, message):
    with pytest.raises(VlmergeError, match=message):
        get_method(method).params(params)
    assert get_method("ties").params({"density": 1}) == {"density": 1, "lam": 1.0, "scope": "tensor"}


def test_every_parameter_of_every_method_refuses_nan_infinity_and_a_word():
    for m in METHODS.values():
        for name, param in m.declared.items():
            assert param.problem(param.default) is None, (m.name, name)
            for bad in ([float("nan"), float("inf"), "abc", None] if param.choices is None else ["abc", None]):
                with pytest.raises(VlmergeError, match=f"method {m.name}: parameter {name}="):
                    m.params({name: bad})


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="merge method 'linear' is registered twice"):
        METHODS.add("linear", get_method("linear"))


def test_linear_middle_is_the_weighted_mean():
    text, mm = torch.randn(50), torch.randn(50)
    assert torch.allclose(run("linear", text.tolist(), mm.tolist(), 0.3), 0.3 * text + 0.7 * mm, atol=1e-6)


def _endpoint_inputs(seed: int) -> TensorInputs:
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(6, 4, generator=g) for k in ("text", "mm", "base")}
    w["mm"][0, 0] = -0.0  # a lerp at α = 0 would turn it into +0.0
    xs = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return TensorInputs.twins("w", w["text"], w["mm"], w["base"], {"grams": (xs.T @ xs, 2 * xs.T @ xs)})


@pytest.mark.parametrize("method, params", [("linear", {}), ("slerp", {}), ("regmean", {"gamma": 0.5}),
                                            ("task_arithmetic", {"lam": 1.0})])
def test_endpoints_are_the_inputs_bitwise_where_the_maths_says_so(method, params):
    m, x = get_method(method), _endpoint_inputs(0)
    full = m.params(params)
    assert m.merge(x, 1.0, full) is x.text and m.merge(x, 0.0, full) is x.mm
    out = torch.empty_like(x.mm)
    assert torch.equal(m.merge(x, 0.0, full, out=out).view(torch.int32), x.mm.view(torch.int32))
    assert m.copies(1.0, full) == "text" and m.copies(0.0, full) == "mm" and m.copies(0.5, full) is None


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lam": 2.0}), ("ties", {"density": 0.5}),
                                            ("dare", {"p": 0.5})])
def test_endpoints_of_methods_that_transform_the_inputs_ignore_the_other_model(method, params):
    # Trimming, dropping or scaling the task vector changes the model, so these endpoints are not
    # the inputs; still, at α = 1 the multimodal model has no weight, and at α = 0 the text one.
    m = get_method(method)
    a, b = _endpoint_inputs(1), _endpoint_inputs(2)
    full = m.params(params)
    swap_mm = TensorInputs.twins("w", a.text, b.mm, a.base)
    swap_text = TensorInputs.twins("w", b.text, a.mm, a.base)
    assert m.copies(1.0, full) is None
    assert torch.equal(m.merge(a, 1.0, full), m.merge(swap_mm, 1.0, full))
    assert torch.equal(m.merge(a, 0.0, full), m.merge(swap_text, 0.0, full))
    assert not torch.equal(m.merge(a, 1.0, full), a.text)


def test_task_arithmetic():
    # τ_text = [2, 0], τ_mm = [0, 4]; θ₀ + 2·(½τ_text + ½τ_mm) = [1, 1] + [2, 4]
    assert run("task_arithmetic", [3, 1], [1, 5], 0.5, base=[1, 1], lam=2.0).tolist() == [3, 5]
    assert run("task_arithmetic", [3, 1], [1, 5], 0.25, base=[1, 1]).tolist() == [1.5, 4.0]
    with pytest.raises(VlmergeError, match="needs a base"):
        run("task_arithmetic", [3, 1], [1, 5], 0.5)


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # trimmed (density ½): τ_text -> [3, 0, 0, -4]; τ_mm -> [-2, -2, 0, 0]
    # elected sign of ½τ_text + ½τ_mm = [.5, -1, 0, -2] -> [+, -, 0, -]; agreeing means: [3, -2, 0, -4]
    merged = run("ties", [3, -1, 0.5, -4], [-2, -2, 1, 1], 0.5, base=[0, 0, 0, 0], density=0.5)
    assert merged.tolist() == [3, -2, 0, -4]
    # one threshold over the whole model gives the same here (a single tensor)
    assert run("ties", [3, -1, 0.5, -4], [-2, -2, 1, 1], 0.5, base=[0, 0, 0, 0], density=0.5,
               scope="model").tolist() == [3, -2, 0, -4]
    # λ scales the merged task vector; the base is added back
    assert run("ties", [4, -1, 0.5, -3], [-1, -1, 2, 2], 0.5, base=[1, 1, 1, 1], density=0.5, lam=2.0).tolist() == \
        [7, -3, 1, -7]


def test_ties_keeps_the_floor_of_density_times_n_and_elects_plus_on_a_tie():
    # 3 entries, density ½: ⌊1.5⌋ = 1 entry kept (mergekit's count)
    assert run("ties", [3, -1, 2], [0, 0, 0], 1.0, base=[0, 0, 0], density=0.5).tolist() == [3, 0, 0]
    # a positive density keeps at least one entry
    assert run("ties", [3, -1, 2], [0, 0, 0], 1.0, base=[0, 0, 0], density=0.1).tolist() == [3, 0, 0]
    assert run("ties", [3], [-1], 0.5, base=[1], density=1.0).tolist() == [3.0]  # τ = 2, -2: + elected
    # the same with one threshold over the whole model (a single tensor here)
    assert run("ties", [3, -1, 2], [0, 0, 0], 1.0, base=[0, 0, 0], density=0.5, scope="model").tolist() == [3, 0, 0]


def test_ranked_breaks_ties_at_the_cut_as_the_sort_does():
    from vlmerge.merge.methods.parts import ranked

    g = torch.Generator().manual_seed(0)
    for values in (torch.randint(0, 5, (200,), generator=g).float(), torch.rand(200, generator=g)):
        for lo, hi in ((0, 50), (37, 120), (150, 200), (10, 10)):
            for desc in (False, True):
                expected = torch.zeros(200, dtype=torch.bool)
                expected[torch.sort(values, descending=desc).indices[lo:hi]] = True
                assert torch.equal(ranked(values, lo, hi, descending=desc), expected), (lo, hi, desc)


def test_dare_drops_and_rescales_reproducibly():
    text, mm, base = [1.0] * 1000, [3.0] * 1000, [0.0] * 1000
    no_drop = run("dare", text, mm, 0.5, base=base, p=0.0)
    assert torch.equal(no_drop, run("task_arithmetic", text, mm, 0.5, base=base))
    a = run("dare", text, mm, 1.0, base=base, p=0.5, seed=3)
    assert torch.equal(a, run("dare", text, mm, 1.0, base=base, p=0.5, seed=3))
    assert set(a.unique().tolist()) == {0.0, 2.0}  # kept entries of τ_text (=1) are rescaled by 1/(1−p)
    assert 400 < int((a == 2.0).sum()) < 600
    assert not torch.equal(a, run("dare", text, mm, 1.0, base=base, p=0.5, seed=4))


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    assert run("slerp", [0, 1], [1, 0], 0.0).tolist() == [1, 0]
    assert torch.allclose(run("slerp", [0, 1], [1, 0], 1.0), T([0.0, 1.0]))
    assert torch.allclose(run("slerp", [0, 1], [1, 0], 0.5), T([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.allclose(run("slerp", [2, 2], [1, 1], 0.5), T([1.5, 1.5]))  # parallel: lerp


def test_regmean_equals_the_closed_form_least_squares_solution():
    torch.manual_seed(0)
    x1, x2 = torch.randn(40, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    w1, w2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    # argmin_W ‖X₁Wᵀ − X₁W₁ᵀ‖² + ‖X₂Wᵀ − X₂W₂ᵀ‖²
    lhs, rhs = torch.cat([x1, x2]), torch.cat([x1 @ w1.T, x2 @ w2.T])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    g1, g2 = x1.T @ x1, x2.T @ x2
    assert torch.allclose(regmean_weight([w1, w2], [g1, g2], [0.5, 0.5], gamma=1.0), expected, atol=1e-10)
    # γ = 0: each input column averaged with weights diag(G)
    d1, d2 = torch.diagonal(g1), torch.diagonal(g2)
    diag_avg = (w1 * d1 + w2 * d2) / (d1 + d2)
    assert torch.allclose(regmean_weight([w1, w2], [g1, g2], [0.5, 0.5], gamma=0.0), diag_avg, atol=1e-10)


def test_distances_on_small_vectors():
    x, y = T([1.0, -2, 0, 3]), T([1.0, 2, 0, -1.5])
    assert l2(x, y) == pytest.approx(math.sqrt(0 + 16 + 0 + 20.25))
    assert cosine(x, y) == pytest.approx(1 + 7.5 / math.sqrt(14 * 7.25))
    # |x+y|/(|x|+|y|) = 1, 0, –, 1/3 (both zero: left out) -> SSD = 1 − 4/9
    assert ssd(x, y) == pytest.approx(5 / 9)
    # top-50% magnitudes: x -> [0, -2, 0, 3], y -> [0, 2, 0, -1.5]; ratios 0, 1/3 -> TSSD = 1 − 1/6
    assert tssd(x, y) == pytest.approx(5 / 6)
    assert ssd(x, -x) == pytest.approx(1.0) and ssd(x, x) == pytest.approx(0.0)
    assert ssd(torch.zeros(3), torch.zeros(3)) == 0.0
    assert cosine(x, x) == pytest.approx(0.0, abs=1e-12)


# -- on model directories ------------------------------------------------------------------------

def tiny_llama(path: Path, seed: int, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=32)
    with quiet_transformers():
        LlamaForCausalLM(LlamaConfig(**(shape | overrides))).to(dtype).save_pretrained(path)
    return path


@pytest.fixture
def trio(tmp_path):
    return tiny_llama(tmp_path / "text", 1), tiny_llama(tmp_path / "mm", 2), tiny_llama(tmp_path / "base", 3)


def test_streamed_multi_alpha_merge_equals_single_merges_and_loads(trio, tmp_path):
    text, mm, base = trio
    outs = merge_to_disk(text, mm, tmp_path / "sweep", "ties", [0.0, 0.3, 1.0], base=base, params={"density": 0.5})
    assert [o.name for o in outs] == ["alpha-0.00", "alpha-0.30", "alpha-1.00"]
    single = merge_to_disk(text, mm, tmp_path / "one", "ties", [0.3], base=base, params={"density": 0.5})[0]
    a, b = load_file(outs[1] / "model.safetensors"), load_file(single / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    model = LlamaForCausalLM.from_pretrained(outs[1])
    assert torch.equal(model.state_dict()["lm_head.weight"], a["lm_head.weight"])
    record = json.loads((outs[1] / "merge.json").read_text())
    assert record["method"] == "ties" and record["alpha"] == 0.3 and record["params"]["density"] == 0.5
    assert record["inputs"]["text"]["sha256"] == hashlib.sha256((text / "model.safetensors").read_bytes()).hexdigest()
    assert set(record["inputs"]) == {"text", "mm", "base"}


def test_a_hash_cache_left_beside_an_input_never_reaches_the_merge_record(trio, tmp_path):
    text, mm, _ = trio
    weights = text / "model.safetensors"
    stat = weights.stat()  # a stale (or planted) cache that matches the file's size and mtime
    (text / "model.safetensors.sha256").write_text(
        json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "0" * 64}))
    out = merge_to_disk(text, mm, tmp_path / "m", "linear", [0.5])[0]
    record = json.loads((out / "merge.json").read_text())
    assert record["inputs"]["text"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_linear_merge_to_disk_endpoints_are_the_inputs_bitwise(trio, tmp_path):
    text, mm, _ = trio
    zero, one = merge_to_disk(text, mm, tmp_path / "m", "linear", [0.0, 1.0])
    for out, src in ((zero, mm), (one, text)):
        a, b = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("cross_device", [False, True])
def test_copied_endpoints_are_the_bytes_a_merged_output_would_have(trio, tmp_path, monkeypatch, cross_device):
    text, mm, _ = trio
    if cross_device:  # the output on another file system than the inputs: the kernel cannot copy between them
        def no_kernel_copy(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    zero, one = merge_to_disk(text, mm, tmp_path / "m", "linear", [0.0, 1.0])
    for out, src in ((zero, mm), (one, text)):
        model = ModelDir(src)  # what the merging path writes: our header, then each tensor's bytes
        writer = SafetensorsWriter(tmp_path / "expected.safetensors", model.specs, {"format": "pt"})
        for name in model.names():
            writer.write(name, model.get(name))
        writer.close()
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
        assert not (out / "model.safetensors").samefile(src / "model.safetensors")


def test_rerun_skips_and_a_foreign_output_is_never_overwritten(trio, tmp_path):
    text, mm, _ = trio
    out = merge_to_disk(text, mm, tmp_path / "m", "linear", [0.5])[0]
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    merge_to_disk(text, mm, tmp_path / "m", "linear", [0.5])
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(VlmergeError, match="exists and is not this merge"):
        merge_to_disk(text, mm, tmp_path / "m", "linear", [0.6])
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_in_memory_merger_matches_the_streamed_merge(trio, tmp_path):
    text, mm, base = trio
    merger = PairMerger(Pair.open(text, mm, base))
    model = LlamaForCausalLM.from_pretrained(text)
    for method, params in (("linear", {}), ("task_arithmetic", {"lam": 1.5}), ("ties", {}), ("slerp", {}),
                           ("dare", {"p": 0.3})):
        merger.merge_into(model, method, 0.3, params)
        disk = load_file(merge_to_disk(text, mm, tmp_path / method, method, [0.3], base=base,
                                       params=params)[0] / "model.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[k], disk[k]) for k in disk), method


@pytest.mark.parametrize(
    "make_mm, message",
    [
        (lambda p: tiny_llama(p, 2, intermediate_size=48), "differ at tensor 'model.layers.0.mlp.down_proj.weight': shape"),
        (lambda p: tiny_llama(p, 2, num_hidden_layers=1), "differ in tensors: 'model.layers.1."),
        (lambda p: tiny_llama(p, 2, dtype=torch.bfloat16), "differ at tensor 'lm_head.weight': dtype"),
    ],
)
def test_refusals_name_the_first_differing_tensor(trio, tmp_path, make_mm, message, capsys):
    text, _, _ = trio
    other = make_mm(tmp_path / "other")
    assert main(["merge", "--text", str(text), "--mm", str(other), "--alpha", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_nan_input_and_alpha_range_are_refused(trio, tmp_path, capsys):
    text, mm, _ = trio
    weights = load_file(mm / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, mm / "model.safetensors", metadata={"format": "pt"})
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--alpha", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "tensor 'model.norm.weight' holds NaN or Inf" in capsys.readouterr().err
    assert main(["merge", "--text", str(text), "--mm", str(text), "--alpha", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "outside [0, 1]; pass --allow-extrapolation" in capsys.readouterr().err
    assert main(["merge", "--text", str(text), "--mm", str(text), "--alpha", "1.5", "--allow-extrapolation",
                 "--out", str(tmp_path / "o")]) == 0


def test_streaming_distances_equal_the_whole_vector_definitions(trio, tmp_path):
    text, mm, base = trio
    a, b, z = (load_file(p / "model.safetensors") for p in trio)
    result = distances(ModelDir(text), ModelDir(mm))
    flat = lambda d, pred: torch.cat([d[k].flatten() for k in sorted(d) if pred(k)])  # noqa: E731
    every, layer1 = (lambda k: True), (lambda k: ".layers.1." in k)
    for scope, pred in (("model", every), ("layer.1", layer1)):
        x, y = flat(a, pred), flat(b, pred)
        expected = {"l2": l2(x, y), "cosine": cosine(x, y), "ssd": ssd(x, y), "tssd": tssd(x, y)}
        assert result[scope] == pytest.approx(expected, rel=1e-6, abs=1e-9), scope
    tv = distances(ModelDir(text), ModelDir(mm), ModelDir(base))
    x, y = flat(a, every).double() - flat(z, every).double(), flat(b, every).double() - flat(z, every).double()
    assert tv["model"]["tssd"] == pytest.approx(tssd(x, y), rel=1e-6)
    x, y = flat(a, lambda k: ".layers." in k), flat(b, lambda k: ".layers." in k)
    assert result["transformer"] == pytest.approx({"l2": l2(x, y), "cosine": cosine(x, y), "ssd": ssd(x, y),
                                                   "tssd": tssd(x, y)}, rel=1e-6, abs=1e-9)
    assert set(result) == {"model", "transformer", "layer.0", "layer.1", "embed_tokens", "norm", "lm_head"}
    assert set(distances(ModelDir(text), ModelDir(mm), per_layer=False)) == {"model", "transformer"}


def test_distance_cli_writes_the_parquet_rows(trio, tmp_path):
    import pandas as pd

    text, mm, base = trio
    assert main(["distance", "--a", str(text), "--b", str(mm), "--base", str(base), "--out", str(tmp_path / "d.parquet")]) == 0
    rows = pd.read_parquet(tmp_path / "d.parquet")
    assert list(rows.columns) == ["experiment", "text_run", "mm_run", "text_words", "mm_words", "space", "scope",
                                  "metric", "value", "study"]
    assert set(rows.study) == {""}  # (outside a study)
    assert set(rows.space) == {"weights", "task_vector"} and set(rows.metric) == {"l2", "cosine", "ssd", "tssd"}
    assert len(rows) == 2 * 7 * 4


def test_scopes():
    assert scopes_of("model.language_model.layers.3.self_attn.q_proj.weight") == ["model", "transformer", "layer.3"]
    assert scopes_of("model.multi_modal_projector.linear_1.weight") == ["model", "multi_modal_projector"]
    assert scopes_of("lm_head.weight") == ["model", "lm_head"]


def test_gram_hooks_sum_the_inputs_of_every_linear_layer():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = lin

        def forward(self, input_ids, attention_mask):
            return self.body(input_ids)

    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    grams, tokens = compute_grams(Wrap(), [{"input_ids": x, "attention_mask": mask}])
    kept = x[mask.bool()].double()
    assert tokens == 5 and torch.allclose(grams["body.0.weight"], kept.T @ kept)


# -- α per layer and per module (merge/schedule.py) ----------------------------------------------

def test_a_schedule_gives_each_tensor_the_alpha_of_its_first_matching_condition_by_hand():
    from vlmerge.merge.schedule import check_schedule, tensor_alpha

    n = 5  # layers 0..4: t = 0, 0.25, 0.5, 0.75, 1
    grad = check_schedule([0, 1])
    assert [tensor_alpha(f"model.layers.{i}.mlp.up_proj.weight", 0.3, grad, n) for i in range(n)] == \
        [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tensor_alpha("model.embed_tokens.weight", 0.3, grad, n) == 0.0  # outside the layers: t = 0 (mergekit)
    # three values over five layers: t·2 → 0.2 at t=0, 0.6 at t=0.5, 0.4 at t=1, halfway between
    three = check_schedule([0.2, 0.6, 0.4])
    assert [tensor_alpha(f"model.layers.{i}.x", 0.0, three, n) for i in range(n)] == \
        pytest.approx([0.2, 0.4, 0.6, 0.5, 0.4])
    mixed = check_schedule([{"filter": "multi_modal_projector", "value": 0},
                            {"filter": "self_attn", "value": ["alpha", 1]}])
    assert tensor_alpha("multi_modal_projector.linear_1.weight", 0.4, mixed, n) == 0.0
    assert tensor_alpha("model.layers.2.self_attn.q_proj.weight", 0.4, mixed, n) == pytest.approx(0.7)
    assert tensor_alpha("model.layers.2.mlp.up_proj.weight", 0.4, mixed, n) == 0.4  # no match: the merge's α
    for bad, says in (([{"filter": "mlp"}], "expected {filter"), ([1.5], "outside \\[0, 1\\]"), ([], "expected a list"),
                      ([{"value": "half"}], "neither a number nor 'alpha'")):
        with pytest.raises(VlmergeError, match=says):
            check_schedule(bad)


def test_a_layer_schedule_from_0_to_1_merges_each_layer_at_its_own_alpha(trio, tmp_path):
    text, mm, _ = trio  # two layers: layer 0 at α = 0 (the multimodal model), layer 1 at α = 1 (the text model)
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--alpha", "0.5", "--param", "schedule=[0, 1]",
                 "--out", str(tmp_path / "m")]) == 0
    got = load_file(tmp_path / "m/model.safetensors")
    t, m = load_file(text / "model.safetensors"), load_file(mm / "model.safetensors")
    layer0 = [k for k in got if ".layers.0." in k]
    layer1 = [k for k in got if ".layers.1." in k]
    assert layer0 and layer1
    assert all(torch.equal(got[k], m[k]) for k in layer0) and all(torch.equal(got[k], t[k]) for k in layer1)
    assert torch.equal(got["lm_head.weight"], m["lm_head.weight"])  # outside the layers: t = 0
    record = json.loads((tmp_path / "m/merge.json").read_text())
    assert record["params"]["schedule"] == [{"filter": None, "value": [0, 1]}] and record["alpha"] == 0.5
    # the sweep's in-memory merger gives the same weights
    model = LlamaForCausalLM.from_pretrained(text)
    PairMerger(Pair.open(text, mm)).merge_into(model, "linear", 0.5, {"schedule": [0, 1]})
    assert all(torch.equal(model.state_dict()[k], got[k]) for k in got)


# -- a method is one module: registered from a test file alone, it runs through merge and the sweep --

@pytest.fixture
def toy_method():
    """`toy`: the text model's weights scaled towards the multimodal one's by α and a declared `gain`;
    registered here and nowhere else (the registry belongs to the process: removed afterwards)."""
    from vlmerge.merge.methods import register

    @register("toy", gain=2.0)
    def toy(x: TensorInputs, alpha: float, gain: float) -> torch.Tensor:
        return x.mm + gain * alpha * (x.text - x.mm)

    yield "toy"
    del METHODS._entries["toy"]


def test_a_method_registered_in_a_test_file_runs_through_merge_and_the_sweep(toy_method, trio, twins, tmp_path):
    import subprocess

    from conftest import SMALL_WORLD
    from vlmerge.config import load_config
    from vlmerge.results import read_results
    from vlmerge.sweep.plan import plan
    from vlmerge.sweep.run import run_items

    text, mm, _ = trio
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--method", "toy", "--param", "gain=0.5",
                 "--alpha", "0.5", "--out", str(tmp_path / "m")]) == 0
    got, t, m = (load_file(p / "model.safetensors") for p in (tmp_path / "m", text, mm))
    assert all(torch.allclose(got[k], m[k] + 0.25 * (t[k] - m[k])) for k in got)
    assert json.loads((tmp_path / "m/merge.json").read_text())["params"] == {"gain": 0.5}

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, "sweep.methods=[{name: toy}]", "sweep.alphas=[0.5]",
                             "sweep.tasks=[blimp]", "sweep.distances=false"])
    items = plan(cfg)
    assert items and {it.method for it in items} == {"toy"}
    assert run_items(cfg, items[:1]) == 1
    rows = read_results(root / "results/demo")
    assert set(rows[rows.method != "none"].method) == {"toy"} and set(rows.alpha.dropna()) >= {0.5}


# -- data statistics (merge/statistics/) and Fisher merging ---------------------------------------

def test_fisher_merge_weights_each_entry_by_alpha_and_each_twins_fisher_by_hand():
    text, mm = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([3.0, 4.0, 7.0])
    f_text, f_mm = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x = TensorInputs.twins("w", text, mm, statistics={"fisher": (f_text, f_mm)})
    m = get_method("fisher")
    raw = m.merge(x, 0.5, m.params({"normalize": False, "floor": 1e-12}))
    # entry 0: (½·3·1 + ½·1·3)/(½·3 + ½·1) = 1.5; entry 1: the text twin has no Fisher there → θ_mm;
    # entry 2: equal Fishers → the plain mean
    torch.testing.assert_close(raw, torch.tensor([1.5, 4.0, 6.0]), rtol=0, atol=1e-6)
    full = m.params({})
    full |= m.prepare([x], full)  # each twin's Fisher scaled by its norm over the model: √10 and √3
    assert full["norms"] == pytest.approx({"text": 10 ** 0.5, "mm": 3 ** 0.5})
    a, b = 3 / 10 ** 0.5 + 1e-6, 1 / 3 ** 0.5 + 1e-6
    torch.testing.assert_close(m.merge(x, 0.5, full)[0], torch.tensor((a * 1 + b * 3) / (a + b)), rtol=0, atol=1e-6)
    assert m.merge(x, 1.0, full) is text and m.merge(x, 0.0, full) is mm  # the endpoints are the twins
    plain = TensorInputs.twins("norm", text, mm)  # a tensor without a Fisher: interpolated
    torch.testing.assert_close(m.merge(plain, 0.25, full), torch.lerp(mm, text, 0.25))


class TinyLM(torch.nn.Module):
    """input_ids → logits, with a causal LM's loss (the mean over the shifted, non -100 labels)."""

    def __init__(self, vocab: int = 7, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask, labels):
        import types

        logits = self.head(torch.tanh(self.embed(input_ids)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return types.SimpleNamespace(loss=loss, logits=logits)


def test_fisher_is_the_mean_over_sequences_of_the_squared_gradient_of_each_ones_log_likelihood():
    from vlmerge.merge.statistics.fisher import compute_fisher

    model = TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [2, 2, 2, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # a context position, as the image tokens are
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": labels[:2]},
               {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]
    fisher, tokens = compute_fisher(model, batches)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for seq, keep in zip(ids, mask):  # one sequence at a time: Σ_t log p(x_t | x_<t) over its real tokens
        seq = seq[keep.bool()]
        logp = torch.log_softmax(model.head(torch.tanh(model.embed(seq))), -1)
        loglik = sum(logp[t - 1, seq[t]] for t in range(1, len(seq)))
        grads = torch.autograd.grad(loglik, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.double().square() / len(ids)
    assert tokens == int(mask.sum()) and set(fisher) == set(expected)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-9)


def test_fisher_merging_through_the_cli_computes_the_statistics_of_each_twin_on_its_own_data(twins, tmp_path, capsys):
    import subprocess

    from conftest import SMALL_WORLD
    from vlmerge.layout import list_checkpoints, statistics_file

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    text, mm = (list_checkpoints(root / f"runs/demo/{run}")[-1] for run in ("text", "multimodal"))
    common = [f"paths.root={root}", *SMALL_WORLD, "sweep.statistics_batches=1"]
    out = tmp_path / "m"
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--method", "fisher", "--alpha", "0.5",
                 "--out", str(out)]) == 2
    assert "no statistics-fisher.safetensors; compute it with `vlmerge statistics --statistic fisher" in capsys.readouterr().err
    assert main(["statistics", "--statistic", "fisher", "--checkpoint", str(text), "--checkpoint", str(mm), *common]) == 0
    f_text, f_mm = (load_file(statistics_file(c, "fisher")) for c in (text, mm))
    assert f_text.keys() == f_mm.keys() and not torch.equal(*(f["model.multi_modal_projector.linear_1.weight"]
                                                              for f in (f_text, f_mm)))
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--method", "fisher", "--alpha", "0.3",
                 "--out", str(out)]) == 0
    merged, t, m = (load_file(p / "model.safetensors") for p in (out, text, mm))
    norm_text, norm_mm = (sum(float(v.square().sum()) for v in f.values()) ** 0.5 for f in (f_text, f_mm))
    for name in ("model.multi_modal_projector.linear_1.weight", "model.language_model.layers.0.mlp.up_proj.weight"):
        w_text, w_mm = 0.3 * (f_text[name] / norm_text + 1e-6), 0.7 * (f_mm[name] / norm_mm + 1e-6)
        expected = (w_text * t[name].double() + w_mm * m[name].double()) / (w_text + w_mm)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(merged[name], torch.lerp(m[name], t[name], 0.3), atol=1e-4)  # not a plain lerp
    assert main(["statistics", "--statistic", "fishr", "--checkpoint", str(text), *common]) == 2
    assert "unknown data statistic 'fishr' (known: fisher, grams)" in capsys.readouterr().err


def test_a_method_without_alpha_merges_once_through_merge_and_the_sweep(trio, twins, tmp_path, capsys):
    import subprocess

    from conftest import SMALL_WORLD
    from vlmerge.config import load_config
    from vlmerge.results import read_results
    from vlmerge.sweep.plan import plan
    from vlmerge.sweep.run import run_items

    text, mm, base = trio
    out = tmp_path / "stock"
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--base", str(base), "--method", "model_stock",
                 "--out", str(out)]) == 0
    assert json.loads((out / "merge.json").read_text())["alpha"] is None  # one model, in --out itself
    got, t, m, b = (load_file(p / "model.safetensors") for p in (out, text, mm, base))
    name = "model.layers.0.mlp.up_proj.weight"
    method = get_method("model_stock")
    expected = method.merge(TensorInputs.twins(name, t[name], m[name], b[name]), None, method.params({}))
    torch.testing.assert_close(got[name], expected, rtol=0, atol=0)
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--base", str(base), "--method", "model_stock",
                 "--alpha", "0.5", "--out", str(tmp_path / "no")]) == 2
    assert "method model_stock takes no α (its weights come from the models): leave out --alpha" in capsys.readouterr().err
    assert main(["merge", "--text", str(text), "--mm", str(mm), "--method", "linear", "--out", str(tmp_path / "no")]) == 2
    assert "method linear needs an α (--alpha, the weight of the text model)" in capsys.readouterr().err

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, "sweep.methods=[{name: model_stock}]",
                             "sweep.tasks=[blimp]", "sweep.distances=false", "sweep.probe=false"])
    items = plan(cfg)
    assert items and all(it.alphas == () for it in items)
    assert run_items(cfg, items[:1]) == 1
    rows = read_results(root / "results/demo")
    stock = rows[rows.method == "model_stock"]
    assert len(stock[stock.task == "blimp"].drop_duplicates(["alpha", "subtask", "metric"])) == \
        len(stock[stock.task == "blimp"]) and stock.alpha.isna().all()  # merged and scored once, with no α
    # the analysis's α-based views cannot place it: left out, with a note, not NaN findings
    from vlmerge.analysis.load import load
    from vlmerge.analysis.run import compute

    a = compute(load([root / "results/demo"]), cfg.analysis)
    assert "merges without α (model_stock): left out of the α-based tables, findings and figures" in " ".join(a.notes)
    assert "model_stock" not in set(a.scores.method) and not any("model_stock" in f.text for f in a.findings)
