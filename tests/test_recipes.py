"""Model cards and mergekit recipes: every checkpoint and merge carries a card; every merge mergekit can
express carries a `mergekit.yaml` that mergekit, run on it, turns into our weights; `vlmerge merge
--recipe` reads mergekit's YAML."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Dinov2Config, LlamaConfig

from vlmerge.card import read_front_matter
from vlmerge.cli import main
from vlmerge.hf import quiet_transformers
from vlmerge.layout import mergekit_recipe, mergekit_text_model, model_card
from vlmerge.merge.core import merge_to_disk
from vlmerge.model import PooledLlavaConfig, init_model
from vlmerge.train.checkpoint import Provenance, TrainState, write_checkpoint

from conftest import REPO
from test_merge import tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench_method_parity as bench  # noqa: E402

PEERS = Path(os.environ.get("PEERS_VENV", REPO / ".venv-peers"))
no_peers = pytest.mark.skipif(not (PEERS / "bin" / "python").is_file(), reason="no peer venv with mergekit (make peers)")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def card(folder: Path) -> tuple[dict, str]:
    text = model_card(folder).read_text()
    return read_front_matter(text), text


def merge(*argv: str) -> None:
    assert main(["merge", "--quiet", *map(str, argv)]) == 0


@pytest.fixture
def trio(tmp_path) -> tuple[Path, Path, Path]:
    return tiny_llama(tmp_path / "text", 1), tiny_llama(tmp_path / "mm", 2), tiny_llama(tmp_path / "base", 3)


@pytest.fixture(scope="module")
def vl_trio(tmp_path_factory) -> dict[str, Path]:
    """Three small checkpoints of our image-taking model: a base and two twins that moved away from it,
    the norms only a little, so that some twin tensors are nearly parallel (as trained twins' norms are)."""
    root = tmp_path_factory.mktemp("vl")
    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    config = PooledLlavaConfig(vision_config=Dinov2Config(hidden_size=8, num_hidden_layers=0), text_config=text,
                               image_token_index=63, image_seq_length=1, vision_feature_select_strategy="default")
    model = init_model(config, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    out = {}
    for role, seed in (("base", None), ("text", 2), ("mm", 3)):
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            model.load_state_dict({k: v + (0.01 if "norm" in k else 0.2 * v.pow(2).mean().sqrt().item())
                                   * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()})
        with quiet_transformers():
            model.save_pretrained(root / role)
        out[role] = root / role
    return out


# -- the card and the recipe of a merge ------------------------------------------------------------

def test_a_merge_carries_a_card_with_its_inputs_method_and_parameters_and_a_recipe(trio, tmp_path):
    text, mm, base = trio
    merge("--text", text, "--mm", mm, "--base", base, "--method", "ties", "--alpha", "0.3,0.6",
          "--param", "density=0.5", "--out", tmp_path / "m")
    for alpha in (0.3, 0.6):
        folder = tmp_path / "m" / f"alpha-{alpha:.2f}"
        record = json.loads((folder / "merge.json").read_text())
        front, text_ = card(folder)
        assert front["base_model"] == [str(p.resolve()) for p in (text, mm, base)]
        assert front["library_name"] == "transformers" and {"vlmerge", "merge", "ties", "mergekit"} <= set(front["tags"])
        for role in ("text", "mm", "base"):
            assert record["inputs"][role]["sha256"] in text_
        assert f"ties merge at α = {alpha}" in text_ and "`density`: `0.5`" in text_ and "`scope`: `tensor`" in text_
        assert "LlamaForCausalLM" in text_ and "2 layers, width 16" in text_
        recipe = yaml.safe_load(mergekit_recipe(folder).read_text())
        # text-model inputs: mergekit reads them as they are, no export
        assert recipe["base_model"] == str(base.resolve())
        assert [m["model"] for m in recipe["models"]] == [str(text.resolve()), str(mm.resolve())]
        assert [m["parameters"] for m in recipe["models"]] == [{"weight": alpha, "density": 0.5},
                                                              {"weight": 1 - alpha, "density": 0.5}]
        assert recipe["merge_method"] == "ties" and recipe["parameters"]["normalize"] is True
        assert "export-text" not in mergekit_recipe(folder).read_text()
        # the card's command makes the very same merge again
        command = next(line for line in text_.splitlines() if line.startswith("vlmerge merge "))
        argv = shlex.split(command)[2:]
        argv[argv.index("--out") + 1] = str(tmp_path / f"again-{alpha}")
        merge(*argv)
        again, first = weights(tmp_path / f"again-{alpha}"), weights(folder)
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_image_taking_inputs_are_named_by_their_exported_language_models(vl_trio, tmp_path):
    merge("--text", vl_trio["text"], "--mm", vl_trio["mm"], "--method", "linear", "--alpha", "0.3", "--out",
          tmp_path / "m")
    source = mergekit_recipe(tmp_path / "m").read_text()
    recipe = yaml.safe_load(source)
    exported = {r: mergekit_text_model(tmp_path / "m", r) for r in ("text", "mm")}
    assert [m["model"] for m in recipe["models"]] == [str(exported["text"]), str(exported["mm"])]
    assert "base_model" not in recipe and recipe["parameters"] == {"normalize": True}
    for role in ("text", "mm"):
        assert f"#   vlmerge export-text {vl_trio[role].resolve()} {exported[role]}" in source
    front, text_ = card(tmp_path / "m")
    assert "PooledLlavaForConditionalGeneration" in text_ and "image input: 1 token(s) per image" in text_
    comments = " ".join(line.removeprefix("# ") for line in source.splitlines() if line.startswith("# "))
    assert "the projector is merged by vlmerge alone" in comments


@pytest.mark.parametrize("argv, why", [
    (["--method", "slerp"], "--param eps=0.0005"),
    (["--method", "ties", "--param", "scope=model", "--base", "{base}"], "scope=model"),
    (["--method", "magmax", "--base", "{base}"], "mergekit has no method that computes vlmerge's `magmax`"),
    (["--param", "schedule=[0, 1]"], "an α schedule"),
])
def test_a_merge_mergekit_cannot_express_has_no_recipe_and_its_card_says_why(trio, tmp_path, argv, why):
    text, mm, base = trio
    merge("--text", text, "--mm", mm, "--alpha", "0.3", *[a.format(base=base) for a in argv], "--out", tmp_path / "m")
    assert not mergekit_recipe(tmp_path / "m").exists()
    front, text_ = card(tmp_path / "m")
    assert "No mergekit recipe" in text_ and why in text_ and "mergekit" not in front["tags"]


def test_a_failure_while_writing_the_card_leaves_no_merge(trio, tmp_path, monkeypatch):
    import vlmerge.merge.core as core

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "m"))

    monkeypatch.setattr(core, "merge_card", full_disk)
    text, mm, _ = trio
    assert main(["merge", "--quiet", "--text", str(text), "--mm", str(mm), "--alpha", "0.5", "--out",
                 str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


# -- mergekit on the recipes: our weights ---------------------------------------------------------

# method -> (its parameters, whether it takes the base, our `dare`'s drop probability or None for a method
# whose masks are mergekit's rule (kept where u < p); "" for a method without a random draw)
PARITY = {
    "linear": ([], False, ""),
    "slerp": (["eps=0.0005"], False, ""),
    "task_arithmetic": (["lam=0.8"], True, ""),
    "ties": (["density=0.5"], True, ""),
    "dare": (["p=0.3", "seed=7"], True, 0.3),
    "dare_linear": (["density=0.6", "seed=7"], True, None),
    "dare_ties": (["density=0.6", "seed=7", "normalize=true"], True, None),
    "breadcrumbs": (["density=0.8", "gamma=0.05"], True, ""),
    "breadcrumbs_ties": (["density=0.8", "gamma=0.05", "normalize=true"], True, ""),
    "della": (["density=0.5", "epsilon=0.1", "seed=7"], True, None),
    "della_linear": (["density=0.5", "epsilon=0.1", "seed=7"], True, None),
}


@no_peers
def test_mergekit_run_on_each_recipe_reproduces_the_merge(vl_trio, tmp_path):
    """linear, slerp, TIES, DARE and the rest that mergekit shares: mergekit (its Python API, what
    mergekit-yaml runs) on the generated recipe, after the export-text commands the recipe lists, equals
    `export-text` of our merge within 1e-6. The random methods with mergekit's draw replaced by ours
    (same masks); with its own draw, DARE is another merge, as the recipe says."""
    runs, ours = [], {}
    for method, (params, with_base, drop) in PARITY.items():
        folder = tmp_path / method
        merge("--text", vl_trio["text"], "--mm", vl_trio["mm"], *(["--base", vl_trio["base"]] if with_base else []),
              "--method", method, "--alpha", "0.3", *[a for p in params for a in ("--param", p)], "--out", folder)
        source = mergekit_recipe(folder).read_text()
        for line in source.splitlines():  # the recipe's own instructions
            if line.startswith("#   vlmerge export-text "):
                assert main(shlex.split(line[len("#   vlmerge "):])) == 0
        masks = None if drop == "" else {"seed": 7, "rename": ["model.", "model.language_model."], "drop": drop}
        runs.append({"yaml": str(mergekit_recipe(folder)), "out": str(tmp_path / f"{method}.mk"), "masks": masks})
        assert main(["export-text", str(folder), str(tmp_path / f"{method}.ours")]) == 0
        ours[method] = tmp_path / f"{method}.ours"
    runs.append({"yaml": str(mergekit_recipe(tmp_path / "dare")), "out": str(tmp_path / "dare-own-draw.mk"),
                 "masks": None})
    # slerp with our default eps: no recipe, because mergekit would lerp where it slerps
    merge("--text", vl_trio["text"], "--mm", vl_trio["mm"], "--method", "slerp", "--alpha", "0.3", "--out",
          tmp_path / "slerp-default")
    assert main(["export-text", str(tmp_path / "slerp-default"), str(tmp_path / "slerp-default.ours")]) == 0
    bench.run_peer_recipes(PEERS / "bin" / "python", runs, tmp_path / "job.json")

    diffs = {m: bench.max_abs_diff(tmp_path / f"{m}.mk", ours[m]) for m in PARITY}
    assert max(diffs.values()) <= 1e-6, diffs
    assert bench.max_abs_diff(tmp_path / "dare-own-draw.mk", ours["dare"]) > 1e-3
    assert bench.max_abs_diff(tmp_path / "slerp.mk", tmp_path / "slerp-default.ours") > 1e-6


# -- reading mergekit's YAML -----------------------------------------------------------------------

@pytest.mark.parametrize("method, params, seed", [
    ("linear", [], None), ("slerp", ["eps=0.0005"], None), ("ties", ["density=0.5", "lam=0.9"], None),
    ("dare_ties", ["density=0.6", "seed=5", "normalize=true"], 5), ("task_arithmetic", ["lam=1.5"], None),
])
def test_our_recipe_read_back_makes_the_same_merge(trio, tmp_path, method, params, seed):
    text, mm, base = trio
    takes_base = method not in ("linear", "slerp")
    merge("--text", text, "--mm", mm, *(["--base", base] if takes_base else []), "--method", method, "--alpha", "0.3",
          *[a for p in params for a in ("--param", p)], "--out", tmp_path / "m")
    merge("--recipe", mergekit_recipe(tmp_path / "m"), *(["--param", f"seed={seed}"] if seed else []),
          "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "merge.json").read_text())
    assert again["method"] == method and again["alpha"] == 0.3
    a, b = weights(tmp_path / "m"), weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_users_recipe_lists_the_base_among_the_models_and_weighs_them_freely(trio, tmp_path):
    text, mm, base = trio
    recipe = tmp_path / "user.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(text), "parameters": {"weight": 1.0}},
                   {"model": str(mm), "parameters": {"weight": 3.0}}],
        "parameters": {"lambda": 0.5, "density": 0.3}, "dtype": "float32"}))
    merge("--recipe", recipe, "--out", tmp_path / "m")
    # θ₀ + 0.5·(τ_text + 3·τ_mm) = θ₀ + 2·(¼·τ_text + ¾·τ_mm)
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["alpha"] == 0.25 and record["params"] == {"lam": 2.0}
    expected = merge_to_disk(text, mm, tmp_path / "direct", "task_arithmetic", [0.25], base=base,
                             params={"lam": 2.0})[0]
    a, b = weights(tmp_path / "m"), weights(expected)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_slerp_recipe_goes_from_its_base_model_and_keeps_mergekits_rule_for_parallel_tensors(trio, tmp_path):
    text, mm, _ = trio
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(mm),
                                      "models": [{"model": str(mm)}, {"model": str(text)}], "parameters": {"t": 0.7}}))
    merge("--recipe", recipe, "--out", tmp_path / "m")
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["inputs"]["text"]["path"] == str(text.resolve()) and record["inputs"]["mm"]["path"] == str(mm.resolve())
    assert record["alpha"] == 0.7 and math.isclose(record["params"]["eps"], 0.0005)


# -- the card of a checkpoint ----------------------------------------------------------------------

def test_a_checkpoint_carries_a_card_with_its_training_data_and_words_seen(tmp_path):
    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    config = PooledLlavaConfig(vision_config=Dinov2Config(hidden_size=8, num_hidden_layers=0), text_config=text,
                               image_token_index=63, image_seq_length=1, vision_feature_select_strategy="default")
    model = init_model(config, seed=0)
    state = TrainState(epoch=1, step=40, words_seen=123_456, tokens_seen=170_000, loss=2.5)
    fresh = Provenance("demo", ("text", "captions"), {"text": ["demo/text.train"], "captions": ["demo/captions.jsonl"]},
                       "`features/features.h5` (facebook/dinov2-large, layer -2, mean_patch)", None, 0)
    out = write_checkpoint(model, tmp_path / "no-tokenizer", tmp_path / "run", state, "multimodal", fresh)
    front, text_ = card(out)
    assert "base_model" not in front and front["library_name"] == "transformers"
    assert {"vlmerge", "multimodal"} <= set(front["tags"])
    assert "words seen: 123,456" in text_ and "`demo/text.train`" in text_ and "`demo/captions.jsonl`" in text_
    assert "facebook/dinov2-large" in text_ and "fresh weights (model.init_seed 0)" in text_
    assert "PooledLlavaForConditionalGeneration" in text_
    seeded = Provenance("demo", ("text",), {"text": ["demo/text.train"], "captions": []}, None, "/runs/demo/seed/x", 0)
    state = TrainState(words_seen=0)
    front, text_ = card(write_checkpoint(model, tmp_path / "no-tokenizer", tmp_path / "run2", state, "text", seeded))
    assert front["base_model"] == ["/runs/demo/seed/x"] and "text-only" in front["tags"]
    assert "none yet (the initialisation)" in text_
