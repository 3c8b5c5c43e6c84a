"""Modality experts (Sung et al. 2023): routing, equal experts == the agnostic model, seed -> experts."""

import pytest
import torch

from vlmerge.config import ModelConfig
from vlmerge.hf import quiet_transformers
from vlmerge.model import (
    EXPERT_MODULES, ExpertLlavaForConditionalGeneration, PooledLlavaForConditionalGeneration, build_config,
    expert_param, expert_routes, experts_from_agnostic, init_model,
)

VARIANTS = tuple(EXPERT_MODULES)
IMAGE = 3


class Tok:
    """The few tokenizer facts `build_config` reads."""

    bos_token_id, eos_token_id, pad_token_id, image_token = 0, 1, 2, "<image>"

    def __len__(self) -> int:
        return 40

    def convert_tokens_to_ids(self, token: str) -> int:
        return IMAGE


def tiny(experts: str = "none", layers: int = 3, cross: int = 1, feature_dim: int = 12):
    mc = ModelConfig(num_layers=layers, hidden_size=16, num_heads=2, intermediate_size=32, max_length=32,
                     experts=experts, cross_modal_layers=cross)
    return build_config(mc, Tok(), feature_dim, experts=experts != "none")


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (3, 9), generator=g)
    ids[:, 0], ids[:, 1] = 0, IMAGE  # BOS, <image>, text…
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(3, 12, generator=g),
            "multimodal": torch.tensor([True, False, True])}


def forward(model, inputs, **kw):
    with torch.no_grad():
        if isinstance(model, ExpertLlavaForConditionalGeneration):
            return model(**inputs, **kw)
        return model(**{k: v for k, v in inputs.items() if k != "multimodal"}, **kw)


def test_routes_put_image_tokens_with_vision_and_multimodal_samples_with_cross_in_the_top_layers():
    ids = torch.tensor([[0, IMAGE, 7, 8], [0, IMAGE, 9, 1]])
    routes = expert_routes(ids, IMAGE, torch.tensor([True, False]), num_layers=3, cross_modal_layers=1)
    assert routes[0].tolist() == routes[1].tolist() == [[1, 0, 1, 1], [1, 0, 1, 1]]
    assert routes[2].tolist() == [[2, 2, 2, 2], [1, 0, 1, 1]]  # the text-only sample keeps its routing


@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_experts_compute_the_agnostic_model_bitwise(variant):
    plain = init_model(tiny(), 5)
    for model in (experts_from_agnostic(plain, variant, 1), init_model(tiny(variant), 5)):
        names = [n for n, _ in model.named_parameters()]
        assert any(".experts.vision." in n for n in names) and any(".experts.cross." in n for n in names)
        assert not any(".experts.cross." in n for n in names if ".layers.0." in n)  # lower layers: v, l only
        x = batch()
        assert torch.equal(forward(model, x).logits, forward(plain, x).logits)


def test_seed_weights_initialise_every_expert_exactly():
    plain = init_model(tiny(), 1)
    shared = plain.state_dict()
    model = experts_from_agnostic(plain, "all", 1)
    for name, t in model.state_dict().items():
        assert torch.equal(t, shared[expert_param(name)[0]]), name
    # 7 linear layers + 2 norms per layer, two experts below, three in the top layer
    assert sum(expert_param(n)[1] is not None for n in model.state_dict()) == 9 * (2 + 2 + 3)


def perturb(model, layer: int, expert: str, within: tuple[str, ...] = ("",)) -> None:
    """Add noise to `expert`'s weights in `layer` (those of modules whose name contains one of `within`)."""
    g = torch.Generator().manual_seed(100 * layer + len(expert))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"layers.{layer}." in name and expert_param(name)[1] == expert and any(w in name for w in within):
                p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["all", "ffn", "layernorm"])
def test_a_token_does_not_depend_on_the_other_modality_s_expert(variant):
    x = batch()
    image = x["input_ids"] == IMAGE
    for expert, unchanged in (("language", image), ("vision", ~image)):
        model = init_model(tiny(variant), 2)
        before = forward(model, x, output_hidden_states=True).hidden_states[1]  # after layer 0
        # The modules after the attention: before it, a text token's keys and values (the
        # language expert's) reach the image token through attention, as they should.
        perturb(model, 0, expert, within=("mlp.", "post_attention_layernorm"))
        after = forward(model, x, output_hidden_states=True).hidden_states[1]
        assert torch.equal(after[unchanged], before[unchanged]), expert
        assert not torch.allclose(after[~unchanged], before[~unchanged]), expert


def test_the_cross_modal_expert_serves_multimodal_samples_only():
    model, x = init_model(tiny("all"), 2), batch()
    before = forward(model, x).logits
    perturb(model, 2, "cross")
    after = forward(model, x).logits
    text_only = ~x["multimodal"]
    assert torch.equal(after[text_only], before[text_only])
    assert not torch.allclose(after[~text_only], before[~text_only])


def test_attention_experts_route_the_projections_of_each_token():
    model, x = init_model(tiny("attention"), 2), batch()
    q = model.model.language_model.layers[0].self_attn.q_proj
    seen = {}
    q.register_forward_hook(lambda m, args, out: seen.setdefault("q", out))
    forward(model, x)
    before = seen.pop("q")
    perturb(model, 0, "language")
    forward(model, x)
    image = x["input_ids"] == IMAGE
    assert torch.equal(seen["q"][image], before[image]) and not torch.allclose(seen["q"][~image], before[~image])


def test_an_expert_checkpoint_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = init_model(tiny("ffn"), 4)
    perturb(model, 1, "vision")
    with quiet_transformers():
        model.save_pretrained(tmp_path)
        loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is ExpertLlavaForConditionalGeneration and loaded.config.experts == "ffn"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not isinstance(init_model(tiny(), 0), ExpertLlavaForConditionalGeneration)
    assert isinstance(init_model(tiny(), 0), PooledLlavaForConditionalGeneration)


# -- merging the experts into one agnostic model (Sung et al. §4.1) ------------------------------

from vlmerge.cli import main  # noqa: E402
from vlmerge.merge.experts import merge_experts  # noqa: E402
from vlmerge.merge.statistics.grams import compute_grams  # noqa: E402
from vlmerge.merge.io import ModelDir  # noqa: E402
from vlmerge.merge.methods import EXPERTS, METHODS, TensorInputs, get_method  # noqa: E402
from vlmerge.model import expert_param_name  # noqa: E402

T = torch.tensor


def expert_merge(method: str, alpha, weights, base=None, grams=None, **params) -> torch.Tensor:
    """One tensor merged by the expert method `experts_<method>`, as the merger calls it."""
    m = get_method("experts_" + method)
    return m.merge(TensorInputs("w", weights, base, {} if grams is None else {"grams": grams}), alpha, m.params(params))


def test_the_expert_methods_are_ordinary_methods_of_the_registry():
    from vlmerge.modelkey import EXPERT_METHOD_PREFIX

    experts = {name: m for name, m in METHODS.items() if m.inputs == EXPERTS}
    assert set(experts) == {"experts_interpolation", "experts_arithmetic", "experts_regmean"}
    assert all(name.startswith(EXPERT_METHOD_PREFIX) for name in experts)  # how the analysis tells them apart
    assert not experts["experts_arithmetic"].takes_alpha and experts["experts_arithmetic"].needs_base
    assert experts["experts_regmean"].statistics == ("grams",) and experts["experts_regmean"].defaults == {"gamma": 0.9}


def test_interpolation_and_the_two_thirds_rule_by_hand():
    v, lang, vl = T([[1.0, 2.0]]), T([[3.0, 4.0]]), T([[6.0, 6.0]])
    assert torch.allclose(expert_merge("interpolation", 0.25, {"vision": v, "language": lang}), T([[2.5, 3.5]]))
    # ⅔(¼·v + ¾·l) + ⅓·vl = ⅔·[2.5, 3.5] + [2, 2]
    assert torch.allclose(expert_merge("interpolation", 0.25, {"vision": v, "language": lang, "cross": vl}), T([[11 / 3, 13 / 3]]))


def test_modality_arithmetic_adds_the_experts_task_vectors_to_the_seed():
    seed, v, lang, vl = T([1.0, 1.0]), T([3.0, 1.0]), T([1.0, 5.0]), T([2.0, 2.0])
    assert expert_merge("arithmetic", None, {"vision": v, "language": lang}, seed, lam=0.5).tolist() == [2.0, 3.0]
    assert expert_merge("arithmetic", None, {"vision": v, "language": lang, "cross": vl}, seed, lam=1.0).tolist() == [4.0, 6.0]


def test_regmean_over_experts_is_the_weighted_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = {e: torch.randn(30, 4, generator=g, dtype=torch.float64) for e in ("vision", "language", "cross")}
    ws = {e: torch.randn(3, 4, generator=g, dtype=torch.float64) for e in xs}
    merged = expert_merge("regmean", 0.75, ws, grams={e: x.T @ x for e, x in xs.items()}, gamma=1.0)
    # Independently: argmin_W Σ_e c_e‖X_e Wᵀ − X_e W_eᵀ‖², c = ⅔·(¾, ¼) and ⅓, as one stacked least squares.
    c = {"vision": 2 / 3 * 0.75, "language": 2 / 3 * 0.25, "cross": 1 / 3}
    a = torch.cat([c[e] ** 0.5 * xs[e] for e in xs])
    b = torch.cat([c[e] ** 0.5 * xs[e] @ ws[e].T for e in xs])
    assert torch.allclose(merged, torch.linalg.lstsq(a, b).solution.T, atol=1e-9)
    # γ = 0 keeps only the diagonal: each input dimension weighted by its energy
    diag = expert_merge("regmean", 0.75, ws, grams={e: x.T @ x for e, x in xs.items()}, gamma=0.0)
    energy = {e: (x * x).sum(0) for e, x in xs.items()}
    expected = sum(c[e] * energy[e] * ws[e] for e in xs) / sum(c[e] * energy[e] for e in xs)
    assert torch.allclose(diag, expected, atol=1e-9)


def test_expert_grams_sum_the_inputs_of_the_tokens_routed_to_each_expert():
    model, x = init_model(tiny("attention"), 3), batch()
    x["attention_mask"][2, -3:] = 0  # padding is left out
    grams, _ = compute_grams(model, [x])
    with torch.no_grad():
        embeds = forward(model, x, output_hidden_states=True).hidden_states[0]
        h = model.model.language_model.layers[0].input_layernorm(embeds).double()
    image = x["input_ids"] == IMAGE
    for expert, where in (("vision", image), ("language", ~image)):
        expected = torch.zeros(16, 16, dtype=torch.float64)
        for b, t in zip(*torch.nonzero(where & x["attention_mask"].bool(), as_tuple=True)):
            expected += torch.outer(h[b, t], h[b, t])  # one token at a time
        name = expert_param_name("model.language_model.layers.0.self_attn.q_proj.weight", expert)
        assert torch.allclose(grams[name], expected, atol=1e-9), expert


@pytest.fixture
def expert_checkpoint(tmp_path):
    """A trained-looking expert checkpoint (experts apart), its seed (the agnostic model) and Grams."""
    seed = init_model(tiny(), 7)
    model = experts_from_agnostic(seed, "all", 1)
    for layer in range(3):
        for e in ("vision", "language", "cross"):
            perturb(model, layer, e)
    with quiet_transformers():
        seed.save_pretrained(tmp_path / "seed")
        model.save_pretrained(tmp_path / "experts")
    from safetensors.torch import save_file

    from vlmerge.layout import statistics_file

    grams, _ = compute_grams(model, [batch(1), batch(2)])
    save_file(grams, statistics_file(tmp_path / "experts", "grams"))
    return tmp_path / "experts", tmp_path / "seed", model


@pytest.mark.parametrize("method,extra", [("interpolation", []), ("regmean", ["--param", "gamma=0.5"]),
                                          ("arithmetic", ["--param", "lam=0.6"])])
def test_merge_experts_writes_a_plain_checkpoint_by_each_rule(expert_checkpoint, tmp_path, method, extra):
    from transformers import AutoModelForImageTextToText

    ckpt, seed, model = expert_checkpoint
    args = ["--alpha", "0.75"] if method != "arithmetic" else ["--seed", str(seed)]
    assert main(["merge-experts", "--checkpoint", str(ckpt), "--method", method, *args, *extra,
                 "--out", str(tmp_path / "merged")]) == 0
    with quiet_transformers():
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(merged) is PooledLlavaForConditionalGeneration  # today's architecture, for eval and sweep
    state, experts, seeds = merged.state_dict(), model.state_dict(), ModelDir(seed)
    grams = ModelDir(ckpt).path / "statistics-grams.safetensors"
    from safetensors.torch import load_file

    grams = load_file(grams)
    for name, t in state.items():
        members = {e: experts[expert_param_name(name, e)] for e in ("vision", "language", "cross")
                   if expert_param_name(name, e) in experts}
        if not members:  # shared tensors (embeddings, projector, LM head, final norm) are copied
            assert torch.equal(t, experts[name]), name
            continue
        if method == "arithmetic":
            expected = seeds.get(name) + 0.6 * sum(w - seeds.get(name) for w in members.values())
        elif method == "regmean" and name.endswith("proj.weight"):
            g = {e: grams[expert_param_name(name, e)] for e in members}
            expected = expert_merge("regmean", 0.75, members, grams=g, gamma=0.5)
        else:
            c = {"vision": 0.75, "language": 0.25} if len(members) == 2 else {"vision": 0.5, "language": 0.5 / 3,
                                                                              "cross": 1 / 3}
            expected = sum(c[e] * w for e, w in members.items())
        assert torch.allclose(t, expected, atol=1e-6), name
    x = batch()
    forward(merged, x)  # it runs as the plain model
    # its card names the checkpoint (and the seed), the method and the command that makes it again
    from vlmerge.card import read_front_matter

    card = (tmp_path / "merged" / "README.md").read_text()
    assert read_front_matter(card)["base_model"] == [str(ckpt.resolve())] + ([str(seed.resolve())] * (method == "arithmetic"))
    assert f"vlmerge merge-experts --checkpoint {ckpt.resolve()} --method {method}" in card
    assert "No mergekit recipe" in card and not (tmp_path / "merged" / "mergekit.yaml").exists()


def test_merge_experts_refuses_a_plain_model_and_a_missing_seed(expert_checkpoint, tmp_path, capsys):
    ckpt, seed, _ = expert_checkpoint
    assert main(["merge-experts", "--checkpoint", str(seed), "--out", str(tmp_path / "m")]) == 2
    assert "expected 'vlmerge_llava_experts'" in capsys.readouterr().err
    assert main(["merge-experts", "--checkpoint", str(ckpt), "--method", "arithmetic", "--out", str(tmp_path / "m")]) == 2
    assert "give the seed weights" in capsys.readouterr().err
    outs = merge_experts(ckpt, [tmp_path / "a"], "experts_interpolation", [(0.5, {})])
    assert merge_experts(ckpt, outs, "experts_interpolation", [(0.5, {})]) == outs  # a rerun skips
    with pytest.raises(Exception, match="not this merge"):
        merge_experts(ckpt, outs, "experts_interpolation", [(0.25, {})])
    with pytest.raises(Exception, match="merges the twins, not the experts"):
        merge_experts(ckpt, [tmp_path / "b"], "linear", [(0.5, {})])
    assert main(["merge", "--text", str(seed), "--mm", str(seed), "--method", "experts_interpolation", "--alpha", "0.5",
                 "--out", str(tmp_path / "c")]) == 2
    assert "merges the experts of one expert checkpoint" in capsys.readouterr().err


# -- the phases on the demo world: seed -> experts -> merge -> eval ------------------------------

@pytest.mark.slow
def test_seed_then_experts_then_merge_then_eval_on_the_demo_world(fresh_root, tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    from conftest import FAST_TRAIN, SMALL_WORLD, vlmerge_cli
    from vlmerge.layout import checkpoint_words, list_checkpoints
    from vlmerge.modelkey import ModelKey

    root = fresh_root()
    common = [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, "runs.seed_pretraining=true", "runs.seed.epochs=1",
              "train.epochs=1", "train.micro_batch_size=16", "train.log_every=20", "model.experts=all",
              "model.cross_modal_layers=1"]
    for run in ("seed", "experts"):
        r = vlmerge_cli("train", "--quiet", "--run", run, *common)
        assert r.returncode == 0, r.stderr
    seed_last = load_file(list_checkpoints(root / "runs/demo/seed")[-1] / "model.safetensors")
    experts = list_checkpoints(root / "runs/demo/experts")
    first, last = load_file(experts[0] / "model.safetensors"), load_file(experts[-1] / "model.safetensors")
    assert experts[0].name == "words-000000000000"
    for name, t in first.items():  # every expert starts as the seed's module, exactly
        assert torch.equal(t, seed_last[expert_param(name)[0]]), name
    moved = [n for n in last if expert_param(n)[1] and not torch.equal(last[n], first[n])]
    assert {expert_param(n)[1] for n in moved} == {"vision", "language", "cross"}  # every expert learnt

    r = vlmerge_cli("statistics", "--quiet", "--statistic", "grams", "--checkpoint", str(experts[-1]), *common)
    assert r.returncode == 0, r.stderr
    grams = load_file(experts[-1] / "statistics-grams.safetensors")
    assert any(".experts.cross." in k for k in grams) and any(".experts.vision." in k for k in grams)
    # Each method's maths is checked above; here the phases' files and labels carry through:
    # two merges in this process, the one that reads the Gram files from the command line, which
    # `vlmerge eval` then scores.
    seed = list_checkpoints(root / "runs/demo/seed")[-1]
    merge_experts(experts[-1], [tmp_path / "interpolation"], "experts_interpolation", [(0.5, {})])
    merge_experts(experts[-1], [tmp_path / "arithmetic"], "experts_arithmetic", [(None, {})], seed=seed)
    r = vlmerge_cli("merge-experts", "--checkpoint", str(experts[-1]), "--method", "regmean", "--alpha", "0.5",
                    "--out", str(tmp_path / "regmean"))
    assert r.returncode == 0, r.stderr
    for method in ("interpolation", "arithmetic", "regmean"):
        key = ModelKey.of_directory(tmp_path / method)
        assert (key.method, key.text_run, key.mm_run) == (f"experts_{method}", "experts", "experts")
    r = vlmerge_cli("eval", "--quiet", "--model", str(tmp_path / "regmean"), "--task", "blimp", "--out",
                    str(tmp_path / "eval"), *common)
    assert r.returncode == 0, r.stderr
    rows = pd.read_parquet(tmp_path / "eval" / "results.parquet")
    assert set(rows.method) == {"experts_regmean"} and set(rows.text_run) == {"experts"}
    assert rows[rows.metric == "accuracy"].value.between(0, 1).all()
    # The unmerged expert model (MSA) is scored as it is, its text tasks routed as text.
    r = vlmerge_cli("eval", "--quiet", "--model", str(experts[-1]), "--task", "blimp", "--task", "winoground",
                    "--out", str(tmp_path / "msa"), *common)
    assert r.returncode == 0, r.stderr
    rows = pd.read_parquet(tmp_path / "msa" / "results.parquet")
    assert set(rows.method) == {"none"} and set(rows.mm_run) == {"experts"} and set(rows.task) == {"blimp", "winoground"}
    msa_blimp = rows[(rows.task == "blimp") & (rows.metric == "accuracy") & (rows.subtask == "")].value.item()

    # The sweep's expert family: every expert checkpoint merged in memory at each setting, each
    # setting scored as the same merge written to disk and evaluated (above: regmean at α = 0.5).
    sweep = [*common, "sweep.alphas=[0.5, 1.0]", "sweep.tasks=[blimp]", "sweep.methods=[{name: experts_interpolation}, "
             "{name: experts_regmean}, {name: experts_arithmetic, grid: {lam: [0.5, 1]}}]"]
    r = vlmerge_cli("sweep", "run", "--quiet", *sweep)
    assert r.returncode == 0, r.stderr
    got = pd.concat(pd.read_parquet(f) for f in (root / "results/demo/metrics").glob("*.parquet"))
    got = got[(got.task == "blimp") & (got.metric == "accuracy") & (got.subtask == "")]
    merged = got[got.method != "none"]
    assert set(merged.mm_words) == {checkpoint_words(c) for c in experts[1:]}  # every checkpoint after step 0
    last = merged[merged.mm_words == checkpoint_words(experts[-1])]
    settings = {(m, a if a == a else None, p) for m, a, p in zip(last.method, last.alpha, last.method_params)}
    # (the parameters as the sweep's grid gives them, as for every method)
    assert settings == {("experts_interpolation", 0.5, "{}"), ("experts_interpolation", 1.0, "{}"),
                        ("experts_regmean", 0.5, "{}"), ("experts_regmean", 1.0, "{}"),
                        ("experts_arithmetic", None, '{"lam": 0.5}'), ("experts_arithmetic", None, '{"lam": 1}')}
    disk = pd.read_parquet(tmp_path / "eval" / "results.parquet")
    disk = disk[(disk.metric == "accuracy") & (disk.subtask == "")].value.item()
    assert last[(last.method == "experts_regmean") & (last.alpha == 0.5)].value.item() == disk
    msa = got[(got.method == "none") & (got.mm_words == checkpoint_words(experts[-1]))]
    assert msa.value.item() == msa_blimp and set(msa.mm_run) == {"experts"}


def test_expert_distances_compare_the_experts_over_the_transformer(expert_checkpoint, tmp_path):
    import pandas as pd

    from vlmerge.merge.distance import cosine, l2, ssd, tssd

    ckpt, seed, model = expert_checkpoint
    assert main(["distance", "--experts", str(ckpt), "--base", str(seed), "--out", str(tmp_path / "d.parquet")]) == 0
    rows = pd.read_parquet(tmp_path / "d.parquet")
    state, seeds = model.state_dict(), init_model(tiny(), 7).state_dict()
    names = sorted(n for n in seeds if ".layers." in n)
    flat = lambda e, sub=None: torch.cat([(state[expert_param_name(n, e)].double()  # noqa: E731
                                           - (0 if sub is None else sub[n].double())).flatten() for n in names])
    for space, sub in (("weights", None), ("task_vector", seeds)):
        x, y = flat("language", sub), flat("vision", sub)
        got = rows[(rows.scope == "transformer") & (rows.space == space) & (rows.mm_run == "experts:vision")]
        assert dict(zip(got.metric, got.value)) == pytest.approx(
            {"l2": l2(x, y), "cosine": cosine(x, y), "ssd": ssd(x, y), "tssd": tssd(x, y)}, rel=1e-6)
    # the cross-modal expert only lives in the top layer
    assert set(rows[rows.mm_run == "experts:cross"].scope) == {"model", "transformer", "layer.2"}
    assert not rows.scope.isin(["embed_tokens", "lm_head", "multi_modal_projector"]).any()


def test_without_flags_a_sample_whose_image_is_the_null_feature_is_text_only():
    model, x = init_model(tiny("all"), 2), batch()
    flagged = forward(model, x).logits
    model.null_feature = x["pixel_values"][1].clone()  # sample 1 is the text-only one
    inferred = forward(model, {k: v for k, v in x.items() if k != "multimodal"}).logits
    assert torch.equal(inferred, flagged)


# -- the study's report (Sung et al.'s views), on planted results ----------------------------------

def planted_study(root):
    """Results of a study whose drops shrink with K_seed and whose TSSD tracks the drop."""
    from vlmerge.layout import maa_experiment, result_file, study_experiment
    from vlmerge.modelkey import study_key
    from vlmerge.results import DISTANCES_SCHEMA, RESULTS_SCHEMA, write_rows

    out = root / "results" / "sung"
    msa = {0: 0.70, 1: 0.72, 2: 0.74}
    drop = {0: 0.20, 1: 0.10, 2: 0.02}
    tssd_of = {0: 0.9, 1: 0.5, 2: 0.2}

    def row(exp, study, run, method, alpha, params, value):
        return {"experiment": exp, "item_id": "", "text_run": run if method != "none" else "", "mm_run": run,
                "text_words": 10 if method != "none" else None, "mm_words": 10, "method": method, "alpha": alpha,
                "method_params": json.dumps(params), "study": study, "task": "blimp", "subtask": "", "metric": "accuracy",
                "value": value, "n": 100, "code_version": "", "config_hash": "", "slurm_job_id": "", "created_at": ""}

    import json

    settings = [("all", k) for k in (0, 1, 2)] + [("ffn", 2)]
    for variant, k in settings:
        exp, key = study_experiment("sung", variant, k), study_key(variant, k)
        m = msa[k] + (0.01 if variant == "ffn" else 0)
        rows = [row(exp, key, "experts", "none", 0.0, {}, m),
                row(exp, key, "experts", "experts_interpolation", 0.5, {}, m - drop[k]),
                row(exp, key, "experts", "experts_interpolation", 0.75, {}, m - drop[k] - 0.01)]
        if (variant, k) == ("all", 2):
            rows += [row(exp, key, "experts", "experts_regmean", 0.5, {"gamma": 0.9}, m - 0.03),
                     row(exp, key, "experts", "experts_arithmetic", None, {"lam": 1.0}, m - 0.3)]
        write_rows(rows, RESULTS_SCHEMA, result_file(out, "metrics", exp))
        dist = [{"experiment": exp, "text_run": "experts:language", "mm_run": "experts:vision", "text_words": 10,
                 "mm_words": 10, "space": "weights", "scope": "transformer", "metric": metric,
                 "value": tssd_of[k] if metric == "tssd" else [0.3, 0.1, 0.2][k], "study": key}
                for metric in ("l2", "cosine", "ssd", "tssd")]
        write_rows(dist, DISTANCES_SCHEMA, result_file(out, "distances", exp))
    write_rows([row(maa_experiment("sung"), study_key("maa"), "multimodal", "none", 0.0, {}, 0.6)], RESULTS_SCHEMA,
               result_file(out, "metrics", maa_experiment("sung")))
    return out, msa, drop, tssd_of


def test_the_sung_report_shows_the_five_views_with_the_planted_numbers(tmp_path):
    import numpy as np
    import pandas as pd

    from vlmerge.analysis.sung import sung_report
    from vlmerge.config import AnalysisConfig

    results, msa, drop, tssd_of = planted_study(tmp_path)
    report = sung_report([results], tmp_path / "report", AnalysisConfig(bootstrap=0))
    read = lambda name: pd.read_csv(tmp_path / "report" / f"{name}.csv")  # noqa: E731
    main = read("table1_merged_vs_msa_vs_maa").set_index("model")
    assert main.loc["MAA", "blimp"] == pytest.approx(0.6) and main.loc["MSA", "blimp"] == pytest.approx(0.74)
    assert main.loc["MB", "blimp"] == pytest.approx(0.50) and main.loc["ours (interpolation α=0.5)", "blimp"] == pytest.approx(0.72)
    seed = read("figure3_seed_length")
    assert seed["blimp drop"].tolist() == pytest.approx([drop[k] for k in (0, 1, 2)])
    variants = read("figure4_variants").set_index("variant")
    assert variants.loc["ffn", "blimp msa"] == pytest.approx(0.75) and variants.loc["all", "blimp drop"] == pytest.approx(0.02)
    methods = read("table2_methods").set_index("model")
    assert set(methods.index) == {"interpolation α=0.5", "interpolation α=0.75", "regmean α=0.5 gamma=0.9",
                                  "arithmetic lam=1"}
    t5 = read("table5_distance_vs_drop").set_index("metric")
    expected = np.corrcoef([tssd_of[k] for k in (0, 1, 2)], [drop[k] for k in (0, 1, 2)])[0, 1]
    assert t5.loc["tssd", "pearson"] == pytest.approx(expected)
    text = report.read_text()
    assert "shrinks with every longer seed" in text and "the highest is tssd (as Sung et al.)" in text
    assert f"Per task, the highest r: blimp tssd {expected:+.3f}." in text  # bootstrap 0: no interval
    assert "best interpolation 0.7200, best RegMean 0.7100" in text


def test_the_sung_tables_come_from_the_study_column_not_from_experiment_or_folder_names(tmp_path):
    """Renamed experiment folders and experiments (the names in the rows) give the same tables: the
    study's identity (variant, K_seed, MAA) is read from the study column alone."""
    import pyarrow.parquet as pq

    from vlmerge.analysis.sung import sung_report
    from vlmerge.config import AnalysisConfig

    results, *_ = planted_study(tmp_path / "a")
    sung_report([results], tmp_path / "a-report", AnalysisConfig(bootstrap=0))
    renamed = results.rename(results.parent / "renamed")
    for f in renamed.rglob("*.parquet"):
        table = pq.read_table(f)
        names = [f"run{abs(hash(e)) % 997}" for e in table.column("experiment").to_pylist()]  # no -seed<K>, no -maa
        pq.write_table(table.set_column(table.schema.get_field_index("experiment"), "experiment", [names]), f)
    sung_report([renamed], tmp_path / "b-report", AnalysisConfig(bootstrap=0))
    tables = sorted(p.name for p in (tmp_path / "a-report").glob("*.csv"))
    assert len(tables) == 5
    for name in tables:
        before, after = (tmp_path / "a-report" / name).read_text(), (tmp_path / "b-report" / name).read_text()
        assert before == after and before.count("\n") > 1, name


def test_analyze_adds_the_sung_views_when_the_results_are_a_study(tmp_path):
    from vlmerge.analysis import analyze
    from vlmerge.config import AnalysisConfig

    results, *_ = planted_study(tmp_path)
    report = analyze([results], tmp_path / "report", AnalysisConfig(bootstrap=0))
    assert "sung.html" in report.read_text() and (tmp_path / "report" / "table5_distance_vs_drop.csv").is_file()
    # The twins' views leave the expert models out: no MSA read as a "multimodal twin", no expert
    # merge as a merge of twins (only MAA, a multimodal run from scratch, is left for them).
    scores = (tmp_path / "report" / "scores.csv").read_text()
    assert "experts" not in scores and "experts" not in (tmp_path / "report" / "findings.md").read_text()


def test_a_task_whose_msa_is_not_above_chance_shows_no_finding():
    import numpy as np
    import pandas as pd

    from vlmerge.analysis.scores import TaskMetric
    from vlmerge.analysis.sung import findings, not_above_chance

    def reps(value, spread):  # the reported value, then 101 evenly spread bootstrap replicates
        return np.array([value, *np.linspace(value - spread, value + spread, 101)])

    drops = pd.DataFrame({"variant": "all", "k_seed": [0, 1, 0, 1], "task": ["ft_nlvr2"] * 2 + ["blimp"] * 2,
                          "msa": [0.55, 0.5, 0.7, 0.72], "merged": [0.5, 0.5, 0.5, 0.62], "drop": [0.05, 0.0, 0.2, 0.1],
                          "msa_reps": [reps(0.55, 0.1), reps(0.5, 0.1), reps(0.7, 0.05), reps(0.72, 0.05)]})
    tasks = [TaskMetric("ft_nlvr2", "accuracy", "multimodal"), TaskMetric("blimp", "accuracy", "text")]
    at_chance = not_above_chance(drops, tasks)
    assert list(at_chance) == ["ft_nlvr2"]  # its MSA interval reaches 0.5 at both seeds; BLiMP's is above it
    said = findings(drops, pd.DataFrame(), pd.DataFrame(), at_chance)
    assert said[0].startswith("Not shown on ft_nlvr2: the unmerged expert model (MSA) is not above chance (0.5)")
    assert not any("On ft_nlvr2" in s for s in said)
    assert "Longer seed → smaller drop? On blimp the drop after merging shrinks with every longer seed" in said[1]


def test_the_seed_finding_says_whether_the_drop_shrinks_at_every_step():
    from vlmerge.analysis.sung import seed_trend

    assert seed_trend([0.3, 0.2, 0.1]) == "shrinks with every longer seed"
    assert seed_trend([0.24, 0.33, 0.14]) == "is smaller at the longest seed than at the shortest, but not at every step"
    assert seed_trend([0.1, 0.05, 0.1]) == "does not shrink from the shortest to the longest seed"


# -- fine-tuning a modality-expert model (Sung et al.'s MSA): its routing under the classification head ------

@pytest.mark.parametrize("variant", VARIANTS)
def test_the_classifier_routes_an_expert_model_as_its_own_forward_does(variant):
    from vlmerge.finetune.classifier import SequenceClassifier

    plain = init_model(tiny(), 5)
    experts = experts_from_agnostic(plain, variant, 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tuned = SequenceClassifier(experts, 2, dropout=0.0, eps=1e-5).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        agnostic = SequenceClassifier(plain, 2, dropout=0.0, eps=1e-5).eval()
    x = batch()
    args = (x["input_ids"], x["attention_mask"], x["pixel_values"], x["multimodal"])
    with torch.no_grad():
        # equal experts: the agnostic model's logits, whatever the routes
        assert torch.equal(tuned(*args), agnostic(*args[:3]))
        # other cross-modal experts: only the multimodal samples change, the text-only one keeps its language expert
        for name, p in experts.named_parameters():
            if ".experts.cross." in name:
                p.add_(torch.randn_like(p))
        moved = tuned(*args) != agnostic(*args[:3])
        assert moved[[0, 2]].any() and not moved[1].any()
    assert not any(p is q for p in tuned.parameters() for q in experts.lm_head.parameters())  # no LM head to train
