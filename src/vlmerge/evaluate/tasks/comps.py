"""COMPS (Misra et al. 2023, as in BabyLM 2025): does a concept inherit its property?

Format (BabyLM 2025 `evaluation_data/full_eval/comps/`: comps_base.jsonl, comps_wugs.jsonl,
comps_wugs_dist-before.jsonl, comps_wugs_dist-in_between.jsonl; read by the pipeline's
sentence_zero_shot/read_files.py `decode_comps`): one JSON object per line with
`prefix_acceptable`, `prefix_unacceptable` and `property_phrase`. The subset is taken from the
file name: comps_base → base, comps_wugs → wugs, comps_wugs_dist-before → wugs_dist_before,
any other → wugs_dist_in_between (as the pipeline does).

Scoring: the property phrase is the completion of `prefix + " " + property_phrase` after
each prefix; correct iff the acceptable prefix's is the arg-max (a tie counts). Metrics:
accuracy per subset and their unweighted mean (subtask ""). The pipeline's predictions name
the chosen whole sentence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from vlmerge.evaluate.metrics import first_is_best
from vlmerge.evaluate.readers import read_records, strings
from vlmerge.evaluate.tasks import (ItemScore, Metric, Prediction, Request, Scores, Task, accuracy_metrics,
                                    choice_predictions, register)
from vlmerge.problems import ProblemLog

EXPECTED = "COMPS JSONL with prefix_acceptable, prefix_unacceptable and property_phrase"
SUBSETS = {"comps_base": "base", "comps_wugs": "wugs", "comps_wugs_dist-before": "wugs_dist_before"}


@dataclasses.dataclass(frozen=True)
class CompsItem:
    item_id: str  # "<subset>_<n>", the pipeline's prediction id
    subset: str
    prefixes: tuple[str, str]  # acceptable, unacceptable
    phrase: str


def load(path: Path, problems: ProblemLog) -> list[CompsItem]:
    """The items of a JSONL file or a folder of them."""
    items, seen = [], {}
    for file, where, obj in read_records(path, problems, EXPECTED):
        values = strings(obj, ("prefix_acceptable", "prefix_unacceptable", "property_phrase"), where, problems)
        if values is None:
            continue
        subset = SUBSETS.get(file.stem, "wugs_dist_in_between")
        n = seen[subset] = seen.get(subset, -1) + 1
        items.append(CompsItem(f"{subset}_{n}", subset, (values[0], values[1]), values[2]))
    return items


def requests(items: Sequence[CompsItem]) -> list[Request]:
    """The property phrase after each prefix and a space, one group per item."""
    return [Request(it.phrase, context=prefix + " ", group=k) for k, it in enumerate(items) for prefix in it.prefixes]


def evaluate(items: Sequence[CompsItem], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy per subset and their unweighted mean."""
    correct = first_is_best(scores.logprob, [2] * len(items))
    return accuracy_metrics([it.subset for it in items], correct), \
        [ItemScore(it.item_id, it.subset, float(ok)) for it, ok in zip(items, correct)]


def predict(items: Sequence[CompsItem], scores: Scores) -> list[Prediction]:
    return choice_predictions([it.subset for it in items],
                              [tuple(p + " " + it.phrase for p in it.prefixes) for it in items], scores)


register(Task("comps", load, requests, evaluate, predict=predict, babylm="comps"))
