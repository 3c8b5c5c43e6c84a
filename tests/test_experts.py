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
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"layers.{layer}." in name and expert_param(name)[1] == expert and any(w in name for w in within):
                p.add_(torch.randn_like(p))


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
