"""Entity tracking (Kim & Schuster 2023, as in BabyLM 2025): which box holds what after some operations.

Format (BabyLM 2025 `evaluation_data/full_eval/entity_tracking/`, one JSONL per split:
regular, ambiref, move_contents; read by the pipeline's sentence_zero_shot/read_files.py
`decode_entity_tracking`): one JSON object per line with `input_prefix` (the story up to the
box in question), `options` (the candidate contents, the correct one first) and `numops` (how
many operations the story has). An item's subset is `<file stem>_<numops>_ops`.

Scoring: each option is the completion of the sentence `input_prefix + option` (no space is
added); the item is correct iff the first option is the arg-max (a tie counts; compute_results.py
`rank_and_evaluate`). Metrics (run.py `process_results`): accuracy per subset; per split
(regular, ambiref, move_contents) the mean of its subsets' accuracies ("split:<name>"); and
the mean over the splits present (subtask "").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlmerge.evaluate.metrics import accuracy_by, first_is_best
from vlmerge.evaluate.readers import read_records, strings
from vlmerge.evaluate.tasks import (ItemScore, Metric, Prediction, Request, Scores, Task, choice_predictions,
                                    register)
from vlmerge.problems import ProblemLog

EXPECTED = "entity-tracking JSONL with input_prefix, options (correct first) and numops"
SPLITS = ("regular", "ambiref", "move_contents")


@dataclasses.dataclass(frozen=True)
class Story:
    item_id: str  # "<subset>_<n>", the pipeline's prediction id
    subset: str  # "<file stem>_<numops>_ops"
    prefix: str
    options: tuple[str, ...]


def load(path: Path, problems: ProblemLog) -> list[Story]:
    """The stories of a JSONL file or a folder of them (one per split)."""
    stories, seen = [], {}
    for file, where, obj in read_records(path, problems, EXPECTED):
        values = strings(obj, ("input_prefix",), where, problems)
        if values is None:
            continue
        options, numops = obj.get("options"), obj.get("numops")
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) and o for o in options)):
            problems.add(where, "malformed line: 'options' must be a list of at least two non-empty strings")
        elif not isinstance(numops, int) or isinstance(numops, bool) or numops < 0:
            problems.add(where, "malformed line: 'numops' must be a non-negative integer")
        else:
            subset = f"{file.stem}_{numops}_ops"
            n = seen[subset] = seen.get(subset, -1) + 1
            stories.append(Story(f"{subset}_{n}", subset, values[0], tuple(options)))
    return stories


def requests(stories: Sequence[Story]) -> list[Request]:
    """Each option after its story, one group per story."""
    return [Request(o, context=s.prefix, group=k) for k, s in enumerate(stories) for o in s.options]


def split_of(subset: str) -> str | None:
    """The split a subset belongs to (the pipeline matches the prefix of the subset's name)."""
    return next((s for s in SPLITS if subset.startswith(s)), None)


def evaluate(stories: Sequence[Story], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy per subset, mean per split, mean over splits."""
    correct = first_is_best(scores.logprob, [len(s.options) for s in stories])
    per_subset = accuracy_by([s.subset for s in stories], correct)
    metrics = [Metric(k, "accuracy", acc, n) for k, (acc, n) in per_subset.items()]
    split_means = []
    for split in SPLITS:
        mine = [v for k, v in per_subset.items() if split_of(k) == split]
        if mine:
            split_means.append((float(np.mean([acc for acc, _ in mine])), sum(n for _, n in mine)))
            metrics.append(Metric(f"split:{split}", "accuracy", *split_means[-1]))
    if split_means:
        metrics.append(Metric("", "accuracy", float(np.mean([m for m, _ in split_means])), sum(n for _, n in split_means)))
    return metrics, [ItemScore(s.item_id, s.subset, float(ok)) for s, ok in zip(stories, correct)]


def predict(stories: Sequence[Story], scores: Scores) -> list[Prediction]:
    return choice_predictions([s.subset for s in stories], [s.options for s in stories], scores)


register(Task("entity_tracking", load, requests, evaluate, predict=predict, babylm="entity_tracking"))
