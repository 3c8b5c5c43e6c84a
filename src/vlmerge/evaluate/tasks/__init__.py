"""The registry of evaluation tasks. A task is one module of this package that calls `register`.

A task reads its official file format into items, turns items into scoring requests (a
context, a scored continuation, an image), and turns the requests' scores back into metrics.
Scoring itself is the `Scorer`'s (vlmerge.evaluate.scoring): tasks never touch a model, so
their metrics are tested on scores the tests choose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmerge.registry import Registry, import_submodules
from vlmerge.evaluate.metrics import accuracy_by, chosen, macro_mean
from vlmerge.problems import ProblemLog


@dataclasses.dataclass(frozen=True)
class Request:
    """Score the completion `target` after `context`: the sentence is context + target (see the Scorer's prompts)."""

    target: str
    context: str = ""
    image: str | None = None  # an image id of the feature store; None: the null (black) image
    group: int = 0  # requests of one group are scored in the same batch (the two sides of a pair)
    by_subword: bool = False  # a word's surprisal, subword by subword after the retokenised context (get_p2)


@dataclasses.dataclass(frozen=True)
class Scores:
    """What the scorer returns for a list of requests, in the same order."""

    logprob: np.ndarray  # float64 sum of the target's token log-probabilities
    tokens: np.ndarray  # int64 number of target tokens


@dataclasses.dataclass(frozen=True)
class Metric:
    """One row of the results: task, subtask ('' for the task as a whole), metric, value, n."""

    subtask: str
    metric: str
    value: float
    n: int


@dataclasses.dataclass(frozen=True)
class ItemScore:
    """A per-item result (kept for bootstrap intervals): item id, subtask, value (e.g. 1.0 = correct)."""

    item_id: str
    subtask: str
    value: float


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What BabyLM's pipeline saves for one item (`--save_predictions`): its UID, the chosen
    completion, and for the wug tests the first candidate's probability."""

    uid: str
    pred: str | float
    prob: float | None = None
    fields: dict | None = None  # the whole row instead, for a task whose rows are not `<UID>_<n>` (reading)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    # load(path, problems) -> items; malformed lines are recorded in problems (file:line), not fatal
    load: Callable[[Path, ProblemLog], list[Any]]
    # requests(items) -> the scoring requests of all items, in a fixed order
    requests: Callable[[Sequence[Any]], list[Request]]
    # evaluate(items, scores) -> (metrics, per-item scores); scores align with requests(items)
    evaluate: Callable[[Sequence[Any], Scores], tuple[list[Metric], list[ItemScore]]]
    needs_images: bool = False  # items refer to image ids that must be in the feature store
    # predict(items, scores) -> one Prediction per item, in file order (for `eval --export babylm`)
    predict: Callable[[Sequence[Any], Scores], list[Prediction]] | None = None
    babylm: str = ""  # the pipeline's --task name, the folder its predictions go in ("" = none)


def accuracy_metrics(subtasks: Sequence[str], correct: Sequence[bool]) -> list[Metric]:
    """Accuracy per subtask, then their unweighted mean as subtask ''."""
    per_subtask = accuracy_by(subtasks, correct)
    mean, n = macro_mean(per_subtask)
    return [*(Metric(s, "accuracy", acc, k) for s, (acc, k) in per_subtask.items()), Metric("", "accuracy", mean, n)]


def choice_predictions(uids: Sequence[str], completions: Sequence[Sequence[str]], scores: Scores) -> list[Prediction]:
    """The chosen completion of each item (its candidates are consecutive requests)."""
    picks = chosen(scores.logprob, [len(c) for c in completions])
    return [Prediction(u, c[k]) for u, c, k in zip(uids, completions, picks)]


TASKS: Registry[Task] = Registry("task")
get_task = TASKS.lookup


def register(task: Task) -> Task:
    TASKS.add(task.name, task)
    return task


import_submodules(__name__, __path__)
