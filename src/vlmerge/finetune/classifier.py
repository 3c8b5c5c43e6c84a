"""A pretrained model with BabyLM's classification head on its last token.

The head is the pipeline's `ClassifierHead` (evaluation_pipeline/finetune/classifier_model.py):
LayerNorm without affine weights, Linear, GELU, LayerNorm, Dropout, Linear. It reads the base
model's final hidden state (`AutoModel`'s: no LM head) at each input's last real token: the
pipeline's `--take_final` with `--padding_side left`, the setting under which a decoder sees its
whole input (with right padding `--take_final` reads a pad token's state: its issue #38, where
decoders stay at the majority class). Here the last real token is found from the attention mask,
so either padding side reads the same token.

Our multimodal models read every input after its image tokens (`eval.prompt` takmaz2025): the
features of the example's images (a vision-language task), or of the black image (a text task),
as in their training on text and in zero-shot scoring.
"""

from __future__ import annotations

import torch
from torch import nn


def classifier_head(hidden: int, num_labels: int, dropout: float, eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(hidden, eps, elementwise_affine=False),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.LayerNorm(hidden, eps, elementwise_affine=False),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_labels),
    )


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row of a `[B, S]` 0/1 mask: the position of its last 1, whichever side the padding is on."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


class SequenceClassifier(nn.Module):
    """`model.base_model` (the decoder without its LM head) + the head on the last real token."""

    def __init__(self, model: nn.Module, num_labels: int, *, dropout: float, eps: float):
        super().__init__()
        self.base = model.base_model
        self.head = classifier_head(model.config.get_text_config().hidden_size, num_labels, dropout, eps)
        # a modality-expert model routes each token to its expert before the base runs (a plain attribute:
        # the whole model, LM head included, is not the classifier's)
        self.__dict__["route"] = getattr(model, "route", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """`pixel_values`: the features of every image token's image, in order ([images, (K,) D]);
        `multimodal` [B]: which inputs show a real image (an expert model's routes; default none)."""
        if self.route is not None:
            self.route(input_ids, multimodal if multimodal is not None else torch.zeros(
                len(input_ids), dtype=torch.bool, device=input_ids.device))
        image = {} if pixel_values is None else {"pixel_values": pixel_values}
        states = self.base(input_ids=input_ids, attention_mask=attention_mask, **image).last_hidden_state
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.head(states[rows, last_token(attention_mask)])
