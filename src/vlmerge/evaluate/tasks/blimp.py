"""Minimal pairs: `blimp`, `blimp_supplement` and `minimal_pairs`, one reader for all three.

Format (BLiMP, github.com/alexwarstadt/blimp `data/`; BabyLM's blimp_filtered and
supplement_filtered folders): one JSON object per line with `sentence_good` and
`sentence_bad`; BLiMP lines also carry `field`, `linguistics_term`, `UID` and `pairID`.
BabyLM's supplement files (hypernym, qa_congruence_easy, qa_congruence_tricky,
subject_aux_inversion, turn_taking .jsonl; sentences may hold newlines) have no UID and no
field, so, as in the BabyLM 2025 pipeline (evaluation_pipeline/sentence_zero_shot/
read_files.py, `decode_blimp`), a line's subtask is its `UID`, else its file's stem, and the
field "syntax_semantics" is spelled "syntax/semantics" (the original BLiMP uses both).

Each sentence is scored whole (empty context, the null image); a pair is correct iff
log p(good) >= log p(bad) (the arg-max with the good sentence first: a tie counts, as in
compute_results.py `rank_and_evaluate`; 7 real BLiMP pairs are identical sentences). Metrics:
accuracy per subtask, their unweighted mean (subtask ""), and per BLiMP field the accuracy over
all its pairs ("field:<field>": `rank_and_evaluate` counts correct and total per metadata value,
so a field pools its paradigms' pairs).

The helpers here (`task_files`, `read_records`, `strings`, `optional_string`,
`accuracy_metrics`) are shared by the other task modules.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from vlmerge.evaluate.metrics import accuracy_by, first_is_best
from vlmerge.evaluate.readers import optional_string, read_records, strings
from vlmerge.evaluate.tasks import (ItemScore, Metric, Prediction, Request, Scores, Task, accuracy_metrics,
                                    choice_predictions, register)
from vlmerge.problems import ProblemLog

FIELD_SPELLING = {"syntax_semantics": "syntax/semantics"}


@dataclasses.dataclass(frozen=True)
class Pair:
    item_id: str  # "<subtask>/<pairID>" (pairID: the line's, else its index in the subtask)
    subtask: str
    field: str | None
    good: str
    bad: str


def load_pairs(path: Path, problems: ProblemLog) -> list[Pair]:
    """The minimal pairs of a JSONL file or of a folder of them."""
    pairs, seen = [], Counter()
    for file, where, obj in read_records(path, problems, "JSONL lines with sentence_good and sentence_bad"):
        sentences = strings(obj, ("sentence_good", "sentence_bad"), where, problems)
        if sentences is None:
            continue
        subtask, field = optional_string(obj, "UID") or file.stem, optional_string(obj, "field")
        pairs.append(Pair(f"{subtask}/{obj.get('pairID', seen[subtask])}", subtask,
                          FIELD_SPELLING.get(field, field), *sentences))
        seen[subtask] += 1
    return pairs


def pair_requests(pairs: Sequence[Pair]) -> list[Request]:
    """The good then the bad sentence of each pair, whole, one group per pair."""
    return [Request(sentence, group=k) for k, p in enumerate(pairs) for sentence in (p.good, p.bad)]


def evaluate_pairs(pairs: Sequence[Pair], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy per subtask, their macro mean, and per BLiMP field over its pairs."""
    correct = first_is_best(scores.logprob, [2] * len(pairs))
    metrics = accuracy_metrics([p.subtask for p in pairs], correct)
    fielded = [(f"field:{p.field}", ok) for p, ok in zip(pairs, correct) if p.field]
    metrics += [Metric(field, "accuracy", acc, n) for field, (acc, n) in
                accuracy_by([f for f, _ in fielded], [ok for _, ok in fielded]).items()]
    return metrics, [ItemScore(p.item_id, p.subtask, float(ok)) for p, ok in zip(pairs, correct)]


def predict_pairs(pairs: Sequence[Pair], scores: Scores) -> list[Prediction]:
    """The chosen sentence of each pair, under its subtask (the pipeline's UID)."""
    return choice_predictions([p.subtask for p in pairs], [(p.good, p.bad) for p in pairs], scores)


for _name, _babylm in (("blimp", "blimp"), ("blimp_supplement", "blimp"), ("minimal_pairs", "")):
    register(Task(_name, load_pairs, pair_requests, evaluate_pairs, predict=predict_pairs, babylm=_babylm))
