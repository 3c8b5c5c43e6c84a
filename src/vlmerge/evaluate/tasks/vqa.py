"""BabyLM's VQA: an 8-way choice between a VQAv2 question's answer and 7 distractors.

Format (BabyLM 2025, OSF evaluation_data/full_eval/vqa_filtered, read by the pipeline's
sentence_zero_shot/read_files.py `decode_vqa`; the lines were made by the BabyLM baseline's
distractor script as {idx_in_hf_dataset, target_ans, distractors, question, image_id,
question_id}): one JSON object per line with `question`, `target_ans`, `distractors` (a list,
7 in BabyLM's file), `image_id` (the VQAv2 / COCO image id) and `question_id`. The image is
the feature-store image whose id is str(image_id); BabyLM's own pipeline fetches it as row
`idx_in_hf_dataset` of HuggingFaceM4/VQAv2's validation split.

Requests (read_files.py `decode_vqa`): " " + answer after the bare question (sentence =
question + " " + answer), with the item's image, all candidates of an item in one group.
Correct iff the target answer is the arg-max, the target first (a tie counts as correct).
Metric: accuracy (subtask "").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlmerge.evaluate.metrics import first_is_best
from vlmerge.evaluate.tasks import ItemScore, Metric, Prediction, Request, Scores, Task, choice_predictions, register
from vlmerge.evaluate.readers import read_records, strings
from vlmerge.problems import ProblemLog

EXPECTED = "VQA JSONL with question, target_ans, distractors, image_id"


@dataclasses.dataclass(frozen=True)
class VqaItem:
    item_id: str  # question_id, else "file:line"
    question: str
    answers: tuple[str, ...]  # the target answer first, then the distractors
    image: str


def load(path: Path, problems: ProblemLog) -> list[VqaItem]:
    """The questions of a JSONL file or of a folder of them."""
    items = []
    for _, where, obj in read_records(path, problems, EXPECTED):
        values = strings(obj, ("question", "target_ans"), where, problems)
        if values is None:
            continue
        distractors, image = obj.get("distractors"), obj.get("image_id")
        if not (isinstance(distractors, list) and distractors and all(isinstance(d, str) and d for d in distractors)):
            problems.add(where, "malformed line: 'distractors' must be a non-empty list of non-empty strings")
        elif not isinstance(image, (int, str)) or isinstance(image, bool) or image == "":
            problems.add(where, "malformed line: 'image_id' must be an integer or a non-empty string")
        else:
            items.append(VqaItem(str(obj.get("question_id", where)), values[0], (values[1], *distractors), str(image)))
    return items


def requests(items: Sequence[VqaItem]) -> list[Request]:
    """Every candidate answer of an item after its question, with its image; one group per item."""
    return [Request(" " + answer, context=it.question, image=it.image, group=k)
            for k, it in enumerate(items) for answer in it.answers]


def evaluate(items: Sequence[VqaItem], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy: the share of items whose target answer scores highest."""
    correct = first_is_best(scores.logprob, [len(it.answers) for it in items])
    metrics = [Metric("", "accuracy", float(np.mean(correct)), len(items))]
    return metrics, [ItemScore(it.item_id, "", float(ok)) for it, ok in zip(items, correct)]


def predict(items: Sequence[VqaItem], scores: Scores) -> list[Prediction]:
    """The chosen " " + answer of each question (UID "vqa")."""
    return choice_predictions(["vqa"] * len(items), [tuple(" " + a for a in it.answers) for it in items], scores)


register(Task("vqa", load, requests, evaluate, needs_images=True, predict=predict, babylm="vqa"))
