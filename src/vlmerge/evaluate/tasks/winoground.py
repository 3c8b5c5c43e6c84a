"""Winoground (Thrush et al. 2022): text, image and group scores, and BabyLM's unpaired accuracy.

Two tasks share the requests and metrics: `winoground` reads either format below (BabyLM's
filtered set, exported for BabyLM's pipeline); `winoground_full` reads only the Hugging Face
release, the full 400 items as Takmaz et al. (BabyLM 2025) evaluate them, whose "unpaired text
score" is unpaired_accuracy over all 800 images. It has no BabyLM export (the pipeline has no
such task); a filtered per-image line given to it is a per-line problem.

Two formats, one JSON object per line, both read into the same 2 × 2 items:

- the Hugging Face release (facebook/winoground, gated; `data/examples.jsonl`): `id`,
  `caption_0`, `caption_1`, `image_0`, `image_1` (image ids such as "ex_0_img_0", the stems
  of the files in images.zip), `tag`, `secondary_tag`, `num_main_preds`, `collapsed_tag`;
- BabyLM 2025's winoground_filtered (OSF evaluation_data; read by the pipeline's
  sentence_zero_shot/read_files.py `decode_winoground`): one line per image, with
  `image_idx` (the row of the Hugging Face test split, = `id`), `image_key` ("image_0" or
  "image_1"), `caption_0` (that image's own caption, label 0), `caption_1` (the other),
  and the tags. Its image ids become "ex_<image_idx>_img_<k>", the Hugging Face names; one
  line is enough to rebuild the item, and only the images that have a line count toward
  unpaired accuracy.

Each item is scored as four (caption, image) requests, the caption whole after its image.
Metrics (subtask "" and, where `collapsed_tag` is given, "tag:<tag>"): text_score,
image_score, group_score (n = items) and unpaired_accuracy (n = per-image comparisons; see
vlmerge.evaluate.metrics.unpaired_correct). Per-item scores carry the metric in the item id:
"<id>/text_score", "<id>/image_score", "<id>/group_score", "<id>/unpaired_accuracy/<image>".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlmerge.evaluate.metrics import accuracy_by, unpaired_correct, winoground_scores
from vlmerge.evaluate.tasks import ItemScore, Metric, Prediction, Request, Scores, Task, register
from vlmerge.evaluate.readers import optional_string, read_records, strings
from vlmerge.problems import ProblemLog

EXPECTED = "Winoground JSONL (Hugging Face examples.jsonl or BabyLM's winoground_filtered)"
EXPECTED_FULL = "Winoground JSONL (Hugging Face examples.jsonl)"
FILTERED_IN_FULL = ("BabyLM's filtered per-image line: the full set is Hugging Face's examples.jsonl; "
                    "point task winoground at this file")
IMAGE_KEYS = {"image_0": 0, "image_1": 1}


@dataclasses.dataclass(frozen=True)
class WinogroundItem:
    item_id: str
    captions: tuple[str, str]  # caption k is the one true of image k
    images: tuple[str, str]  # feature-store image ids
    tag: str | None  # collapsed_tag
    unpaired: tuple[int, ...] = (0, 1)  # the images whose own-caption comparison counts


def _item(obj: dict, where: str, problems: ProblemLog) -> WinogroundItem | None:
    """The item of one line of either format; None (and a problem) when malformed."""
    tag = optional_string(obj, "collapsed_tag")
    if "image_idx" not in obj:
        values = strings(obj, ("caption_0", "caption_1", "image_0", "image_1"), where, problems)
        if values is None:
            return None
        return WinogroundItem(str(obj.get("id", where)), (values[0], values[1]), (values[2], values[3]), tag)
    idx, key = obj["image_idx"], optional_string(obj, "image_key")
    if not isinstance(idx, int) or isinstance(idx, bool) or key not in IMAGE_KEYS:
        problems.add(where, "malformed line: expected an integer 'image_idx' and 'image_key' image_0 or image_1")
        return None
    captions = strings(obj, ("caption_0", "caption_1"), where, problems)
    if captions is None:
        return None
    k = IMAGE_KEYS[key]
    own, other = captions
    return WinogroundItem(str(idx), (own, other) if k == 0 else (other, own),
                          (f"ex_{idx}_img_0", f"ex_{idx}_img_1"), tag, (k,))


def load(path: Path, problems: ProblemLog, *, full: bool = False) -> list[WinogroundItem]:
    """The items of a file or folder, in first-seen order; BabyLM's per-image lines are merged,
    or with `full` (Hugging Face lines only) each recorded as a problem and left out."""
    items: dict[str, WinogroundItem] = {}
    for _, where, obj in read_records(path, problems, EXPECTED_FULL if full else EXPECTED):
        if full and "image_idx" in obj:
            problems.add(where, FILTERED_IN_FULL)
            continue
        item = _item(obj, where, problems)
        if item is None:
            continue
        first = items.setdefault(item.item_id, item)
        if (first.captions, first.images) != (item.captions, item.images):
            problems.add(where, f"malformed line: item {item.item_id} differs from its earlier line (kept that)")
        elif first is not item:
            items[item.item_id] = dataclasses.replace(first, unpaired=tuple(sorted({*first.unpaired, *item.unpaired})))
    return list(items.values())


def load_full(path: Path, problems: ProblemLog) -> list[WinogroundItem]:
    """The Hugging Face items only, both images of each counting toward unpaired accuracy."""
    return load(path, problems, full=True)


def requests(items: Sequence[WinogroundItem]) -> list[Request]:
    """(caption c, image i) for c, i in 00, 01, 10, 11; one group per item."""
    return [Request(it.captions[c], image=it.images[i], group=k)
            for k, it in enumerate(items) for c in (0, 1) for i in (0, 1)]


def _metric(name: str, correct: np.ndarray, tags: Sequence[str | None]) -> list[Metric]:
    """The mean over all comparisons, then over each tag's."""
    rows = [Metric("", name, float(np.mean(correct)), len(correct))]
    tagged = [(f"tag:{t}", ok) for t, ok in zip(tags, correct) if t is not None]
    per_tag = accuracy_by([t for t, _ in tagged], [ok for _, ok in tagged])
    return rows + [Metric(t, name, acc, n) for t, (acc, n) in per_tag.items()]


def evaluate(items: Sequence[WinogroundItem], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Text, image and group scores per item; unpaired accuracy per listed image."""
    s = scores.logprob.reshape(len(items), 2, 2)
    tags = [it.tag for it in items]
    subtasks = [f"tag:{t}" if t is not None else "" for t in tags]
    metrics, per_item = [], []
    for name, correct in winoground_scores(s).items():
        metrics += _metric(name, correct, tags)
        per_item += [ItemScore(f"{it.item_id}/{name}", sub, float(ok)) for it, sub, ok in zip(items, subtasks, correct)]
    pairs = [(n, i) for n, it in enumerate(items) for i in it.unpaired]
    item, image = (np.array(col, dtype=np.int64) for col in zip(*pairs))
    correct = unpaired_correct(s, item, image)
    metrics += _metric("unpaired_accuracy", correct, [tags[n] for n in item])
    per_item += [ItemScore(f"{items[n].item_id}/unpaired_accuracy/{items[n].images[i]}", subtasks[n], float(ok))
                 for n, i, ok in zip(item, image, correct)]
    return metrics, per_item


def predict(items: Sequence[WinogroundItem], scores: Scores) -> list[Prediction]:
    """BabyLM's per-image lines (UID "winoground"): the caption each listed image prefers, its own on a tie."""
    s = scores.logprob.reshape(len(items), 2, 2)
    return [Prediction("winoground", it.captions[i] if s[n, i, i] >= s[n, 1 - i, i] else it.captions[1 - i])
            for n, it in enumerate(items) for i in it.unpaired]


register(Task("winoground", load, requests, evaluate, needs_images=True, predict=predict, babylm="winoground"))
register(Task("winoground_full", load_full, requests, evaluate, needs_images=True))
