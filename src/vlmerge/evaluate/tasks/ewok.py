"""EWoK (Ivanova et al. 2024), scored exactly as the BabyLM 2025 pipeline scores it.

Formats. BabyLM distributes EWoK as a folder of `<Domain>.jsonl` (full: ewok_filtered, written
by evaluation_pipeline/ewok/dl_and_filter.py from the gated Hugging Face dataset
ewok-core/ewok-core-1.0; fast: ewok_fast.zip on OSF), one JSON object per line with
`Domain`, `Context1`, `Context2`, `Target1`, `Target2`, `ContextType`, `ContextDiff`,
`TargetDiff`, … . dl_and_filter.py writes every EWoK item twice: as is, and with both the
contexts and the targets swapped. A `.csv` with the same columns (EWoK's own one-row-per-item
release) is read too, and each row is expanded into those same two lines.

Scoring (sentence_zero_shot/read_files.py `decode_ewok` with the causal backend,
compute_results.py `rank_and_evaluate`): a line is correct iff
log p(" " + Target1 | Context1) >= log p(" " + Target2 | Context1) (a tie counts); Context2 is not scored.
With the swapped copy, an item contributes both "T1 fits C1 better than T2" and "T2 fits C2
better than T1", each counted separately. Metrics: accuracy per Domain and their unweighted
mean (subtask "").
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from vlmerge.evaluate.metrics import first_is_best
from vlmerge.evaluate.tasks import (ItemScore, Metric, Prediction, Request, Scores, Task, accuracy_metrics,
                                    choice_predictions, register)
from vlmerge.evaluate.readers import strings, task_files
from vlmerge.problems import ProblemLog, read_jsonl

EXPECTED = "EWoK .jsonl or .csv with Domain, Context1, Context2, Target1, Target2"


@dataclasses.dataclass(frozen=True)
class EwokLine:
    item_id: str  # "<Domain>/<index within the domain>"
    domain: str
    context: str
    targets: tuple[str, str]  # the one that fits the context first


def _csv_records(file: Path) -> Iterator[tuple[str, dict]]:
    with open(file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{file}:{reader.line_num}", row


def load(path: Path, problems: ProblemLog) -> list[EwokLine]:
    """BabyLM's EWoK lines from a file or folder; each CSV row gives the line and its swapped copy."""
    lines, seen = [], Counter()
    for file in task_files(path, (".jsonl", ".csv"), EXPECTED):
        from_csv = file.suffix == ".csv"
        for where, obj in _csv_records(file) if from_csv else read_jsonl(file, problems):
            names = ("Domain", "Context1", "Target1", "Target2") + (("Context2",) if from_csv else ())
            values = strings(obj, names, where, problems)
            if values is None:
                continue
            domain, c1, t1, t2, *c2 = values
            for context, targets in [(c1, (t1, t2)), *((c, (t2, t1)) for c in c2)]:
                lines.append(EwokLine(f"{domain}/{seen[domain]}", domain, context, targets))
                seen[domain] += 1
    return lines


def requests(lines: Sequence[EwokLine]) -> list[Request]:
    """Each target, after a space, following the line's context; one group per line."""
    return [Request(" " + t, context=line.context, group=k) for k, line in enumerate(lines) for t in line.targets]


def evaluate(lines: Sequence[EwokLine], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy per Domain and the unweighted mean over domains."""
    correct = first_is_best(scores.logprob, [2] * len(lines))
    items = [ItemScore(line.item_id, line.domain, float(ok)) for line, ok in zip(lines, correct)]
    return accuracy_metrics([line.domain for line in lines], correct), items


def predict(lines: Sequence[EwokLine], scores: Scores) -> list[Prediction]:
    """The chosen " " + target of each line, under its Domain (the pipeline's UID)."""
    return choice_predictions([line.domain for line in lines], [tuple(" " + t for t in line.targets) for line in lines],
                              scores)


register(Task("ewok", load, requests, evaluate, predict=predict, babylm="ewok"))
