"""The LLaVA-style model fed precomputed, pooled image vectors: one per example, or K of them.

`PooledLlavaForConditionalGeneration` is `LlavaForConditionalGeneration` without a vision
tower: `pixel_values` is the pooled DINOv2 feature `[B, D]`, which the multimodal projector
(Linear -> GELU -> Linear) maps into the embedding of the single `<image>` token; or, from a
store of `features.grid` G, `[B, K, D]` with K = G² (`config.image_seq_length`), one vector per
`<image>` token, K of them per example. Parameter names are LLaVA's
(`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`). Importing this module
registers the classes with transformers' Auto classes.

`ExpertLlavaForConditionalGeneration` is the modality-specific variant of Sung et al. (2023, §3):
chosen modules of each decoder layer (`model.experts`: all, attention, ffn, layernorm) hold one
copy per modality, named `…<module>.experts.<vision|language|cross>.weight`. Image tokens use the
vision expert and text tokens the language expert; in the top `cross_modal_layers` layers every
token of a multimodal sample uses the cross-modal expert, while a text-only sample keeps the
routing of the lower layers (its black image token stays with the vision expert).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from vlmerge.config import ModelConfig
from vlmerge.errors import VlmergeError
from vlmerge.hf import EXPERT_MODEL_TYPE, MODEL_TYPE, TEXT_PREFIX
from vlmerge.io import atomic_path
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class PooledLlavaConfig(LlavaConfig):
    """LlavaConfig whose `vision_config.hidden_size` is the pooled feature's size."""

    model_type = MODEL_TYPE


class PooledLlavaModel(LlavaModel):
    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel's own __init__ would build a vision tower
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Pooled features `[B, D]` (one token per image) or `[B, K, D]` (K tokens per image) -> the
        projected tokens, as LLaVA's list of `[K, H]`."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        tokens = pixel_values.reshape(len(pixel_values), -1, pixel_values.shape[-1])  # [B, K, D]
        # Projected as rows [B·K, D], as a single vector always was: RegMean's Gram hooks read a
        # 3-D input as [batch, text positions] and would mask it with the attention mask.
        projected = self.multi_modal_projector(tokens.flatten(0, 1).to(dtype)).unflatten(0, tokens.shape[:2])
        return BaseModelOutputWithPooling(pooler_output=list(projected))


class PooledLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = PooledLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def is_multimodal(model_type: str | None) -> bool:
    """Whether a model type is one of our image-taking models (plain or with experts)."""
    return model_type in (MODEL_TYPE, EXPERT_MODEL_TYPE)


AutoConfig.register(MODEL_TYPE, PooledLlavaConfig)
AutoModel.register(PooledLlavaConfig, PooledLlavaModel)
AutoModelForImageTextToText.register(PooledLlavaConfig, PooledLlavaForConditionalGeneration)


# -- modality experts (Sung et al. 2023, §3) -------------------------------------------------

VISION, LANGUAGE, CROSS = "vision", "language", "cross"
LOWER_EXPERTS = (VISION, LANGUAGE)  # the route index of a token is its expert's position here
TOP_EXPERTS = (VISION, LANGUAGE, CROSS)
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
EXPERT_MODULES = {"all": _ATTENTION + _FFN + _NORMS, "attention": _ATTENTION, "ffn": _FFN, "layernorm": _NORMS}
_EXPERT_PARAM = re.compile(r"\.experts\.(vision|language|cross)\.")


def expert_param(name: str) -> tuple[str, str | None]:
    """`…q_proj.experts.vision.weight` -> (`…q_proj.weight`, "vision"); a shared name -> (name, None)."""
    m = _EXPERT_PARAM.search(name)
    return (name, None) if m is None else (name[: m.start()] + "." + name[m.end():], m.group(1))


def expert_param_name(name: str, expert: str) -> str:
    """The inverse of `expert_param`: a shared parameter's name -> its copy in `expert`."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.experts.{expert}.{leaf}"


class ExpertLlavaConfig(PooledLlavaConfig):
    """PooledLlavaConfig plus which modules are modality-specific and how many top layers are cross-modal."""

    model_type = EXPERT_MODEL_TYPE
    experts: str = "all"
    cross_modal_layers: int = 0


class Routed(torch.nn.Module):
    """A token-wise module (a linear layer or a norm) with one copy per expert.

    Every expert runs on every token and `torch.where` keeps each token's own expert's output:
    the very operations of the shared module, so that equal experts give the agnostic model's
    output bitwise (running each expert on its tokens only would change the matmul shapes).
    """

    def __init__(self, module: torch.nn.Module, experts: tuple[str, ...]):
        super().__init__()
        self.experts = torch.nn.ModuleDict({e: copy.deepcopy(module) for e in experts})
        self.route: torch.Tensor | None = None  # [B, T] index into `experts`, set by the model per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            raise RuntimeError("Routed module called without a route (run it inside ExpertLlavaForConditionalGeneration)")
        out = None
        for k, expert in enumerate(self.experts.values()):
            y = expert(x)
            out = y if out is None else torch.where((self.route == k).unsqueeze(-1), y, out)
        return out


def layer_experts(config: ExpertLlavaConfig, layer: int) -> tuple[str, ...]:
    """The experts of decoder layer `layer`: vision and language, plus cross-modal in the top layers."""
    lower = config.text_config.num_hidden_layers - config.cross_modal_layers
    return LOWER_EXPERTS if layer < lower else TOP_EXPERTS


def expert_routes(input_ids: torch.Tensor, image_token: int, multimodal: torch.Tensor, num_layers: int,
                  cross_modal_layers: int) -> list[torch.Tensor]:
    """Per layer, each token's expert index: vision (0) for image tokens, language (1) for text,
    cross-modal (2) for every token of a multimodal sample in the top layers."""
    modality = (input_ids != image_token).long()
    top = torch.where(multimodal.to(torch.bool).unsqueeze(1), len(LOWER_EXPERTS), modality)
    lower = num_layers - cross_modal_layers
    return [modality if i < lower else top for i in range(num_layers)]


class ExpertLlavaForConditionalGeneration(PooledLlavaForConditionalGeneration):
    config_class = ExpertLlavaConfig

    def __init__(self, config: ExpertLlavaConfig):
        super().__init__(config)
        if config.experts not in EXPERT_MODULES:
            raise VlmergeError(f"experts {config.experts!r}: expected one of {', '.join(EXPERT_MODULES)}")
        # The experts are copies of the initialised shared modules: all start identical (Sung et al. §3).
        for i, layer in enumerate(self.model.language_model.layers):
            for path in EXPERT_MODULES[config.experts]:
                parent_path, _, attr = path.rpartition(".")
                parent = layer.get_submodule(parent_path) if parent_path else layer
                setattr(parent, attr, Routed(getattr(parent, attr), layer_experts(config, i)))

    # The black image's feature ([D], or [K, D] for K image tokens), when known: a sample whose image
    # is exactly it counts as text-only where no `multimodal` flags are given (evaluation passes only
    # the pixel values).
    null_feature: torch.Tensor | None = None

    def forward(self, input_ids: torch.LongTensor | None = None, *args, multimodal: torch.Tensor | None = None,
                **kwargs):
        """`multimodal` [B] bool: which samples carry a real image (default: those whose image is not
        `null_feature`, all of them when it is not set)."""
        if input_ids is None:
            raise VlmergeError("the expert model routes tokens by input_ids; inputs_embeds alone are not supported")
        if multimodal is None:
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            if self.null_feature is not None and pixels is not None:
                multimodal = (pixels.float() != self.null_feature.to(pixels.device)).flatten(1).any(-1)
            else:
                multimodal = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.route(input_ids, multimodal)
        return super().forward(input_ids, *args, **kwargs)

    def route(self, input_ids: torch.Tensor, multimodal: torch.Tensor) -> None:
        """Set every Routed module's route for the next forward of these inputs (of `self.model` too,
        which a fine-tuning head calls without the LM head)."""
        layers = self.model.language_model.layers
        routes = expert_routes(input_ids, self.config.image_token_index, multimodal, len(layers),
                               self.config.cross_modal_layers)
        for layer, route in zip(layers, routes):
            for module in layer.modules():
                if isinstance(module, Routed):
                    module.route = route


AutoConfig.register(EXPERT_MODEL_TYPE, ExpertLlavaConfig)
AutoModelForImageTextToText.register(ExpertLlavaConfig, ExpertLlavaForConditionalGeneration)


def expert_config(config: PooledLlavaConfig, experts: str, cross_modal_layers: int) -> ExpertLlavaConfig:
    """The expert variant of an agnostic model's config."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    return ExpertLlavaConfig(**fields, experts=experts, cross_modal_layers=cross_modal_layers)


def agnostic_config(config: ExpertLlavaConfig) -> PooledLlavaConfig:
    """The agnostic (plain) model's config of an expert model's config."""
    drop = ("model_type", "architectures", "transformers_version", "experts", "cross_modal_layers")
    return PooledLlavaConfig(**{k: v for k, v in config.to_dict().items() if k not in drop})


def experts_from_agnostic(model: PooledLlavaForConditionalGeneration, experts: str,
                          cross_modal_layers: int) -> ExpertLlavaForConditionalGeneration:
    """An expert model whose every expert is a copy of the agnostic model's module (seed -> experts)."""
    with torch.random.fork_rng(devices=[]):  # the fresh weights are overwritten: leave the RNG as it was
        out = ExpertLlavaForConditionalGeneration(expert_config(model.config, experts, cross_modal_layers))
    shared = model.state_dict()
    out.load_state_dict({name: shared[expert_param(name)[0]] for name in out.state_dict()})
    return out.eval()


def build_config(mc: ModelConfig, tokenizer, feature_dim: int, feature_layer: int = -2,
                 *, image_tokens: int = 1, experts: bool = False) -> PooledLlavaConfig:
    """The model config from the experiment's `model` section, tokenizer, feature size and image
    tokens per image (G² for a store of `features.grid` G); the expert variant (`model.experts`)
    when `experts`."""
    if mc.vocab_size is not None and mc.vocab_size < len(tokenizer):
        raise VlmergeError(f"model.vocab_size {mc.vocab_size}: smaller than the tokenizer's {len(tokenizer)} tokens")
    text = LlamaConfig(
        vocab_size=mc.vocab_size or len(tokenizer),
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_heads,
        max_position_embeddings=mc.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # The vision config only records the feature's shape: no vision weights exist.
    vision = Dinov2Config(hidden_size=feature_dim, num_hidden_layers=0)
    config = PooledLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_seq_length=image_tokens,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if not experts:
        return config
    if mc.experts == "none":
        raise VlmergeError("model.experts is none: choose all, attention, ffn or layernorm for the expert run")
    return expert_config(config, mc.experts, mc.cross_modal_layers)


def init_model(config: PooledLlavaConfig, seed: int) -> PooledLlavaForConditionalGeneration:
    """Fresh weights that depend on `seed` alone (the global RNG is left as it was); an expert
    model's experts are copies of the agnostic model's weights from the same seed."""
    cls = ExpertLlavaForConditionalGeneration if isinstance(config, ExpertLlavaConfig) else PooledLlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_text(checkpoint: Path, out: Path) -> Path:
    """Write a checkpoint's language model alone as a `LlamaForCausalLM` directory (atomically)."""
    cfg_path, weights_path = checkpoint / "config.json", checkpoint / "model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise VlmergeError(f"{checkpoint}: not a checkpoint (needs config.json and model.safetensors)")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise VlmergeError(f"{checkpoint}: model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    tensors = load_file(weights_path)
    text = {"model." + k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    text["lm_head.weight"] = tensors["lm_head.weight"]
    text_config = LlamaConfig(**config["text_config"])
    text_config.architectures = ["LlamaForCausalLM"]
    with atomic_path(out, is_dir=True) as tmp:
        save_file({k: v.contiguous() for k, v in text.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        text_config.save_pretrained(tmp)
        copy_tokenizer_files(checkpoint, tmp)
    return out
