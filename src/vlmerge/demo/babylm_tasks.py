"""Tiny BabyLM-format entity-tracking and wug files for the demo world.

They are synthetic: they exist so that the demo sweep exercises the readers, the scoring rules
and the metrics of `entity_tracking` and `wug_adj` end to end, not to measure anything.

- `eval/entity_tracking/regular.jsonl` (read_files.py `decode_entity_tracking`'s format): boxes
  holding two things of the demo lexicon (one box empty), 0–2 "Move the X into Box k."
  operations into the empty box, then "Box k contains" and the options (the true contents first, then the other boxes' contents).
- `eval/wug_adj_nominalization/wug_adj_nominalization.jsonl` (`decode_wug`'s format): made-up
  adjectives with "-ness" and "-ity" nominalisations, tab-separated, and a made-up human ratio
  for the "-ness" form (some 0).
- `eval/glue/cola.{train,valid}.jsonl` (BabyLM's glue_filtered format of CoLA: `sentence`,
  `label`): acceptability of the demo grammar's agreement, for `vlmerge finetune`. Each minimal
  pair of the BLiMP builders (on the training words, unlike the demo BLiMP) gives one of its two
  sentences, the grammatical (1) or the other (0) at random; three quarters of each phenomenon's
  pairs train, the rest are the valid split. Whether a model can tell them apart after
  fine-tuning rests on what it learnt of agreement.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from vlmerge.demo.grammar import Grammar, Lexicon
from vlmerge.demo.tasks import PHENOMENA, minimal_pairs
from vlmerge.io import write_jsonl

ENTITY_TRACKING = "eval/entity_tracking"
GLUE = "eval/glue"
TRAIN_SHARE = 0.75  # of each phenomenon's acceptability pairs
WUG_ADJ = "eval/wug_adj_nominalization"
SYLLABLES = ("ba", "blick", "dax", "fep", "glor", "ki", "lum", "mo", "nad", "pim", "ru", "tov", "wug", "zo")


def _contents(thing: str | None) -> str:
    return f" the {thing}." if thing else " nothing."


def entity_stories(things: Sequence[str], n: int, rng: random.Random) -> list[dict]:
    """`n` stories over three boxes, each with 0–2 move operations."""
    rows = []
    for k in range(n):
        boxes: list[str | None] = [*rng.sample(list(things), 2), None]
        rng.shuffle(boxes)
        text = ", ".join(f"Box {b} contains {'the ' + t if t else 'nothing'}" for b, t in enumerate(boxes)) + "."
        numops = k % 3
        for _ in range(numops):
            src = rng.choice([b for b, t in enumerate(boxes) if t])
            dst = boxes.index(None)  # one box is always empty: things move into it
            text += f" Move the {boxes[src]} into Box {dst}."
            boxes[dst], boxes[src] = boxes[src], None
        asked = rng.randrange(3)
        others = [t for b, t in enumerate(boxes) if b != asked]
        options = [_contents(boxes[asked])] + [o for o in dict.fromkeys(map(_contents, others)) if o != _contents(boxes[asked])]
        rows.append({"input_prefix": f"{text} Box {asked} contains", "options": options, "numops": numops,
                     "sample_id": k})
    return rows


def wug_items(n: int, rng: random.Random) -> list[dict]:
    """`n` made-up adjectives with both nominalisations and a made-up ratio for "-ness"."""
    rows = []
    for _ in range(n):
        adj = "".join(rng.sample(SYLLABLES, 2)) + rng.choice(("ic", "al", "ous", "y"))
        a, b = (f"The wug is very {adj}. Its {adj}{s} is clear." for s in ("ness", "ity"))
        rows.append({"sentences": f"{a}\t{b}", "ratio": rng.choice((0.0, round(rng.random(), 2)))})
    return rows


def write_babylm_tasks(root: Path, things: Sequence[str], rng: random.Random, n: int = 24) -> dict[str, int]:
    """Write both files under the world's `root`; the item counts."""
    stories = write_jsonl(root / ENTITY_TRACKING / "regular.jsonl", entity_stories(things, n, rng))
    wugs = write_jsonl(root / WUG_ADJ / "wug_adj_nominalization.jsonl", wug_items(n, rng))
    return {"entity_tracking": stories, "wug_adj": wugs}


def acceptability_splits(lexicon: Lexicon, words: Lexicon, pairs: int, rng: random.Random) -> dict[str, list[dict]]:
    """CoLA-format train and valid rows: one sentence of each of `pairs` pairs per phenomenon on `words`."""
    splits: dict[str, list[dict]] = {"train": [], "valid": []}
    for phenomenon in PHENOMENA:
        rows = minimal_pairs(phenomenon, Grammar(lexicon, rng), words, pairs)
        cut = round(TRAIN_SHARE * len(rows))
        for k, row in enumerate(rows):
            label = rng.randrange(2)
            splits["train" if k < cut else "valid"].append(
                {"sentence": row["sentence_good"] if label else row["sentence_bad"], "label": label})
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_acceptability(root: Path, lexicon: Lexicon, words: Lexicon, pairs: int, rng: random.Random) -> dict[str, int]:
    """Write `eval/glue/cola.{train,valid}.jsonl` under the world's `root`; the row counts."""
    return {split: write_jsonl(root / GLUE / f"cola.{split}.jsonl", rows)
            for split, rows in acceptability_splits(lexicon, words, pairs, rng).items()}
