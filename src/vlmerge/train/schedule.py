"""Pure schedules: checkpoint word counts, the learning rate, and how a global batch is shared out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeVar

from vlmerge.errors import VlmergeError

T = TypeVar("T")

MILLION = 1_000_000


def babylm_words() -> list[int]:
    """BabyLM 2025's checkpoints: 1M…10M words by 1M, 20M…100M by 10M, 200M…1B by 100M."""
    return (
        [k * MILLION for k in range(1, 11)]
        + [k * 10 * MILLION for k in range(2, 11)]
        + [k * 100 * MILLION for k in range(2, 11)]
    )


def checkpoint_words(spec: Literal["babylm"] | Sequence[int]) -> list[int]:
    """The configured word counts, sorted, positive, without repeats."""
    words = babylm_words() if spec == "babylm" else list(spec)
    return sorted({int(w) for w in words if w > 0})


def batch_shape(micro_batch_size: int, grad_accum: int, global_batch: int | None, world: int) -> tuple[int, int]:
    """(examples per optimizer step, micro-batches per rank per step) on `world` ranks: a fixed
    `global_batch` gives each world size its own accumulation; without it the batch grows with the
    ranks (micro_batch_size × grad_accum × world)."""
    if global_batch is None:
        return micro_batch_size * grad_accum * world, grad_accum
    per_round = micro_batch_size * world
    if global_batch % per_round:
        raise VlmergeError(f"train.global_batch {global_batch} is not a multiple of micro_batch_size "
                           f"{micro_batch_size} × {world} rank(s) = {per_round}")
    return global_batch, global_batch // per_round


def rank_micro_batches(pieces: Sequence[T], micro_batch_size: int, rank: int, world: int, accum: int) -> list[list[T]]:
    """This rank's micro-batches of a global batch: the batch is cut into world × accum slots of
    `micro_batch_size` in order (a short batch leaves the last slots empty), and slot j goes to rank
    j mod world. The slots, and so each step's gradient, do not depend on how many ranks share them."""
    return [list(pieces[j * micro_batch_size : (j + 1) * micro_batch_size])
            for j in range(rank, world * accum, world)]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
