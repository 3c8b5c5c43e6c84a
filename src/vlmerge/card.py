"""Model cards in the Hugging Face Hub's format: YAML front matter (`base_model`, `tags`,
`library_name`), then markdown. Checkpoints (`vlmerge.train.checkpoint`) and merges
(`vlmerge.merge.recipe`) each write one beside their weights (`layout.model_card`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

LIBRARY = "transformers"


def render(title: str, sections: Sequence[tuple[str, str]], *, tags: Sequence[str],
           base_model: Sequence[str] = ()) -> str:
    """The card: front matter, `# title`, then each (heading, markdown) as a `##` section.
    `base_model` is left out when empty (a model trained from scratch has none)."""
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = list(base_model)
    meta |= {"tags": list(tags), "library_name": LIBRARY}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    body = "\n".join(f"## {heading}\n\n{text.rstrip()}\n" for heading, text in sections)
    return f"---\n{front}---\n\n# {title}\n\n{body}"


def read_front_matter(text: str) -> dict[str, Any]:
    """The front matter of a card (what the Hub reads); {} when it has none."""
    if not text.startswith("---\n"):
        return {}
    front, sep, _ = text[4:].partition("\n---\n")
    return (yaml.safe_load(front) or {}) if sep else {}


def architecture(config: dict[str, Any]) -> str:
    """A model's shape from its `config.json`, as markdown: the class, the language model's layers,
    width, heads, MLP and vocabulary, and, for our image-taking models, the projector and image tokens."""
    text = config.get("text_config") or config
    classes = ", ".join(config.get("architectures") or []) or "?"
    lines = [f"- `{classes}` (model type `{config.get('model_type', '?')}`)",
             f"- language model: {text.get('num_hidden_layers', '?')} layers, width {text.get('hidden_size', '?')}, "
             f"{text.get('num_attention_heads', '?')} attention heads, MLP {text.get('intermediate_size', '?')}, "
             f"vocabulary {text.get('vocab_size', '?')}, at most {text.get('max_position_embeddings', '?')} positions"]
    if "vision_config" in config:
        feature = config["vision_config"].get("hidden_size", "?")
        lines.append(f"- image input: {config.get('image_seq_length', 1)} token(s) per image, each a precomputed "
                     f"{feature}-d image feature through the projector (Linear {feature}→{text.get('hidden_size', '?')}, "
                     f"{config.get('projector_hidden_act', '?')}, Linear); no vision tower")
    if config.get("experts"):
        lines.append(f"- modality experts: {config['experts']}, the top {config.get('cross_modal_layers', 0)} "
                     "layer(s) cross-modal")
    return "\n".join(lines)
