"""BabyLM 2025's (Super)GLUE tasks: how each reads its `glue_filtered/<task>.{train,valid}.jsonl`
and which recipe `eval_finetuning.sh` gives it.

The fields and templates are the pipeline's (evaluation_pipeline/finetune/dataset.py `Dataset`):
an input is the A text, or the pair (A, B), each side the listed fields joined by a space or
put into the side's template. The labels, metrics and batch/epoch choices are eval_finetuning.sh's:
MNLI has 3 labels and accuracy alone; MRPC and QQP keep the epoch of best F1, the others of best
accuracy; BoolQ and MultiRC take the big-batch size, WSC its own number of epochs. CoLA, QNLI and
SST-2 are read by the pipeline but not in its script: they take the common recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.problems import ProblemLog, read_jsonl
from vlmerge.registry import Registry


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    a_fields: tuple[str, ...]
    b_fields: tuple[str, ...] = ()
    a_template: str | None = None
    num_labels: int = 2
    metrics: tuple[str, ...] = ("accuracy", "f1", "mcc")
    metric_for_valid: str = "accuracy"
    big_batch: bool = False  # eval_finetuning.sh's BIG_BSZ (boolq, multirc)
    long_schedule: bool = False  # eval_finetuning.sh's WSC_EPOCHS (wsc)


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled input: the A text and, for a pair task, the B text."""

    a: str
    b: str | None
    label: int


TASKS: Registry[GlueTask] = Registry("fine-tuning task")
for _task in (
    GlueTask("boolq", ("question",), ("passage",), big_batch=True),
    GlueTask("cola", ("sentence",)),
    GlueTask("mnli", ("premise",), ("hypothesis",), num_labels=3, metrics=("accuracy",)),
    GlueTask("mrpc", ("sentence1",), ("sentence2",), metric_for_valid="f1"),
    GlueTask("multirc", ("question", "answer"), ("paragraph",), "Question: {} Answer: {}", big_batch=True),
    GlueTask("qnli", ("question",), ("sentence",)),
    GlueTask("qqp", ("question1",), ("question2",), metric_for_valid="f1"),
    GlueTask("rte", ("sentence1",), ("sentence2",)),
    GlueTask("sst2", ("sentence",)),
    GlueTask("wsc", ("span2_text", "span1_text"), ("text",), 'Does "{}" refer to "{}" in this passage?',
             long_schedule=True),
):
    TASKS.add(_task.name, _task)
get_task = TASKS.lookup

SPLITS = ("train", "valid")


def split_file(folder: Path, task: str, split: str) -> Path:
    """BabyLM's `glue_filtered/<task>.<split>.jsonl`."""
    return folder / f"{task}.{split}.jsonl"


def _side(row: dict, fields: tuple[str, ...], template: str | None) -> str:
    values = [row[f] for f in fields]
    return template.format(*values) if template is not None else " ".join(values)


def read_split(task: GlueTask, path: Path, problems: ProblemLog) -> list[Example]:
    """The examples of one split file; a line without a field, or with a label outside the task's, is a problem."""
    out = []
    for where, row in read_jsonl(path, problems, f"{task.name} data"):
        missing = [f for f in (*task.a_fields, *task.b_fields, "label") if f not in row]
        if missing:
            problems.add(where, f"missing field: {missing[0]!r}")
            continue
        if not all(isinstance(row[f], str) for f in (*task.a_fields, *task.b_fields)):
            problems.add(where, "bad field: the text fields must be strings")
            continue
        label = row["label"]
        if isinstance(label, bool):  # BoolQ's labels may be JSON booleans
            label = int(label)
        if not isinstance(label, int) or not 0 <= label < task.num_labels:
            problems.add(where, f"bad label: {label!r}, expected an integer in [0, {task.num_labels})")
            continue
        b = _side(row, task.b_fields, None) if task.b_fields else None
        out.append(Example(_side(row, task.a_fields, task.a_template), b, label))
    return out


def read_task(task: GlueTask, folder: Path, problems: ProblemLog) -> dict[str, list[Example]]:
    """Both splits of a task; a split file that is missing or has no usable line stops here, before any training."""
    splits = {}
    for split in SPLITS:
        splits[split] = read_split(task, split_file(folder, task.name, split), problems)
        if not splits[split]:
            raise VlmergeError(f"{split_file(folder, task.name, split)}: no usable {task.name} examples")
    return splits
