"""A DINOv2 encoder that returns one pooled vector per image (or a grid of them), from a chosen hidden layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoModel

from vlmerge.errors import VlmergeError
from vlmerge.hf import quiet_transformers

Pooling = Literal["mean_patch", "cls", "mean_all"]


def pool(hidden: torch.Tensor, pooling: Pooling, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, T, D] token states -> [B, D]. The first `num_prefix_tokens` are CLS (+ registers)."""
    if pooling == "mean_patch":
        return hidden[:, num_prefix_tokens:].mean(dim=1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean_all":
        return hidden.mean(dim=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def grid_pool(hidden: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, T, D] token states -> [B, grid², D]: grid×grid cell means of the patch tokens, row-major.

    The patch tokens (after the CLS/register prefix) are laid out on their square side×side grid
    and pooled by adaptive average pooling: when `grid` divides the side every cell is the exact
    mean of a side/grid × side/grid block; otherwise cell i is the mean of patches ⌊i·side/grid⌋
    to ⌈(i+1)·side/grid⌉ − 1 along each axis: cells may differ in size, and neighbours may share a
    row or column of patches.
    """
    patches = hidden[:, num_prefix_tokens:]
    b, n, d = patches.shape
    side = math.isqrt(n)
    if side * side != n:
        raise VlmergeError(f"features.grid: the encoder gives {n} patch tokens, not a square grid of them")
    cells = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, d, side, side), grid)
    return cells.flatten(2).transpose(1, 2)


def blocks_needed(layer: int, num_layers: int) -> int:
    """How many transformer blocks produce `hidden_states[layer]` (index 0 = the embeddings)."""
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= index <= num_layers:
        raise VlmergeError(
            f"features.layer: {layer} is out of range for an encoder with {num_layers} blocks "
            f"(allowed: {-(num_layers + 1)}..{num_layers})"
        )
    return index


class PooledEncoder(nn.Module):
    """Embeddings + the first k blocks of a DINOv2 model, then pooling.

    Equal to `pool(model(x, output_hidden_states=True).hidden_states[layer])` (`grid_pool` for a
    grid > 1, whose cells are patch means whatever `pooling` says), but the blocks after `layer`
    and the final LayerNorm are never run: they would be thrown away.
    """

    def __init__(self, model: nn.Module, layer: int, pooling: Pooling, grid: int = 1):
        super().__init__()
        num_layers = model.config.num_hidden_layers
        k = blocks_needed(layer, num_layers)
        self.embeddings = model.embeddings
        self.blocks = nn.ModuleList(model.encoder.layer[:k])
        self.pooling, self.grid = pooling, grid
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        self.dim = model.config.hidden_size
        # One image's row in the store: a vector [D], or grid² of them [G², D]
        self.row_shape = (self.dim,) if grid == 1 else (grid * grid, self.dim)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for block in self.blocks:
            hidden = block(hidden)
            # Blocks return a tensor in recent transformers, a tuple in older ones.
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if self.grid > 1:
            return grid_pool(hidden, self.grid, self.num_prefix_tokens)
        return pool(hidden, self.pooling, self.num_prefix_tokens)


def load_encoder(path: str, layer: int, pooling: Pooling, revision: str | None = None, grid: int = 1):
    """(PooledEncoder in eval mode, image processor) from a local `save_pretrained` directory."""
    if not Path(path).is_dir():
        raise VlmergeError(f"features.encoder: {path}: no such directory (a DINOv2 saved with save_pretrained)")
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(path, revision=revision, local_files_only=True, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(path, revision=revision, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmergeError(f"features.encoder: {path}: cannot load a DINOv2 model and image processor ({first})") from None
    if not hasattr(model, "embeddings") or not hasattr(getattr(model, "encoder", None), "layer"):
        raise VlmergeError(f"features.encoder: {path}: {type(model).__name__} is not a DINOv2-style ViT")
    if grid > 1 and grid > (side := crop_size(processor) // model.config.patch_size):
        raise VlmergeError(f"features.grid: {grid} exceeds the encoder's {side}×{side} patch grid "
                           f"({crop_size(processor)}-pixel images, {model.config.patch_size}-pixel patches)")
    return PooledEncoder(model, layer, pooling, grid).eval(), processor


# The feature width of DINOv2's public checkpoints (their hidden size): what a release's vectors
# must have when an import declares one of them (the BabyLM release's are DINOv2-base, 768).
PUBLIC_WIDTHS = {"facebook/dinov2-small": 384, "facebook/dinov2-base": 768, "facebook/dinov2-large": 1024,
                 "facebook/dinov2-giant": 1536}


def declared_width(encoder: str) -> int | None:
    """The width of the vectors `encoder` makes: a local `save_pretrained` directory's hidden size, a
    public DINOv2's, or None for an encoder this cannot know."""
    config = Path(encoder) / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["hidden_size"])
        except (ValueError, KeyError, TypeError):
            return None
    return PUBLIC_WIDTHS.get(encoder.rstrip("/"))


def crop_size(processor) -> int:
    """The square input size the processor produces (224 for DINOv2)."""
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", {})
    return int(size.get("height") or size.get("shortest_edge"))
