"""The fine-tuning tasks: BabyLM 2025's (Super)GLUE tasks, and Sung et al.'s downstream
vision-language tasks.

GLUE: how each reads its `glue_filtered/<task>.{train,valid}.jsonl` and which recipe
`eval_finetuning.sh` gives it.

The fields and templates are the pipeline's (evaluation_pipeline/finetune/dataset.py `Dataset`):
an input is the A text, or the pair (A, B), each side the listed fields joined by a space or
put into the side's template. The labels, metrics and batch/epoch choices are eval_finetuning.sh's:
MNLI has 3 labels and accuracy alone; MRPC and QQP keep the epoch of best F1, the others of best
accuracy; BoolQ and MultiRC take the big-batch size, WSC its own number of epochs. CoLA, QNLI and
SST-2 are read by the pipeline but not in its script: they take the common recipe.

Vision-language (Sung et al. §3: pre-train, merge, then fine-tune), each read from the release's
own files in one folder (vlmerge.finetune.vl_data), its images the feature store's:
- `ft_vqa`: VQAv2's train2014 and val2014 questions and annotations; a classifier over the answer
  vocabulary of the training split (ViLT's: the major answers seen 9 times or more,
  `finetune.vqa_min_answer_count`), trained on the
  answers' soft scores (binary cross-entropy, ViLT's and VLMo's recipe); `vqa_score`, VQA's accuracy
  (a label's soft score is the official leave-one-out accuracy of its answer). Training questions
  with no answer in the vocabulary are left out, as ViLT does; valid ones count, scoring 0.
- `ft_nlvr2`: NLVR²'s train.json and dev.json: the statement after both images' tokens, true or
  false; accuracy.
- `ft_retrieval`: Karpathy's split JSON (dataset_coco.json, dataset_flickr30k.json) of COCO or
  Flickr30k: image-text matching, a binary head on `<image> caption` trained on every training
  caption with its image and with one other training image drawn at random (`finetune.seed`);
  scored on every image × caption pair of the test split, whose match margins rank the captions
  of each image and the images of each caption: R@1/5/10 both ways and their mean (`r_mean`,
  Sung et al.'s measure; the kept epoch's). Differences from ViLT: the negatives are random, not
  mined from the batch; and the test split's n × 5n pairs are all scored, fine for the demo and
  Flickr30k's 1k images, a GPU job for COCO's 5k.
Results rows are named by the task (`ft_vqa`), GLUE's by `glue/<task>`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

from vlmerge.config import FinetuneConfig
from vlmerge.errors import VlmergeError
from vlmerge.finetune import vl_data
from vlmerge.problems import ProblemLog, read_jsonl
from vlmerge.registry import Registry


@dataclasses.dataclass(frozen=True)
class FinetuneTask:
    """A fine-tuning task: how its data are read, its labels, metrics and recipe choices. A GLUE task
    is read from its fields; another family's (vision-language) brings its own `reader`."""

    name: str
    a_fields: tuple[str, ...] = ()
    b_fields: tuple[str, ...] = ()
    a_template: str | None = None
    num_labels: int = 2  # 0: as many as the training split's labels (VQA's answer vocabulary)
    metrics: tuple[str, ...] = ("accuracy", "f1", "mcc")
    metric_for_valid: str = "accuracy"
    big_batch: bool = False  # eval_finetuning.sh's BIG_BSZ (boolq, multirc)
    long_schedule: bool = False  # eval_finetuning.sh's WSC_EPOCHS (wsc)
    family: str = "glue"  # the results' task column: <family>/<name> ("": the name alone)
    # (folder, problems, finetune config) -> {"train": …, "valid": …} (None: GLUE's JSONL files)
    reader: Callable[[Path, ProblemLog, FinetuneConfig], dict[str, list[Example]]] | None = None

    @property
    def result_name(self) -> str:
        return f"{self.family}/{self.name}" if self.family else self.name


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled input: the A text, for a pair task the B text, the images it shows (ids of the
    feature store, in order), and for a task of soft targets (VQA) each label's score."""

    a: str
    b: str | None
    label: int
    images: tuple[str, ...] = ()
    targets: tuple[tuple[int, float], ...] = ()  # (label, score); empty: the label alone, score 1


VQA_FILES = {"train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"),
             "valid": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json")}
NLVR2_FILES = {"train": "train.json", "valid": "dev.json"}


def read_vqa_task(folder: Path, problems: ProblemLog, fc: FinetuneConfig) -> dict[str, list[Example]]:
    """VQAv2's train and val questions as examples over the training split's answer vocabulary."""
    questions = {split: vl_data.read_vqa(folder / q, folder / a, problems) for split, (q, a) in VQA_FILES.items()}
    index = {a: i for i, a in enumerate(vl_data.vqa_answer_vocab(questions["train"], fc.vqa_min_answer_count))}
    splits = {}
    for split, rows in questions.items():
        examples = []
        for q in rows:
            targets = vl_data.vqa_targets(q.answers, index)
            if split == "train" and not targets:
                continue
            best = max(targets, key=lambda k: (targets[k], -k), default=-1)  # -1: no answer of the vocabulary
            examples.append(Example(q.question, None, best, (q.image_id,), tuple(sorted(targets.items()))))
        splits[split] = examples
    return splits


def read_retrieval_task(folder: Path, problems: ProblemLog, fc: FinetuneConfig) -> dict[str, list[Example]]:
    """Karpathy's train split as matching pairs (every caption with its image, 1, and with another
    training image drawn at random, 0), and its test split as every image with every caption, image-major."""
    files = sorted(folder.glob("dataset_*.json"))
    if len(files) != 1:
        raise VlmergeError(f"{folder}: expected one Karpathy split JSON (dataset_<name>.json), found {len(files)}")
    train, test = (vl_data.read_karpathy(files[0], split, problems) for split in ("train", "test"))
    rng = random.Random(fc.seed)  # the negatives: the same for every model fine-tuned with this seed
    pairs = []
    for k, image in enumerate(train):
        for caption in image.captions:
            other = rng.randrange(len(train) - 1) if len(train) > 1 else k
            pairs += [Example(caption, None, 1, (image.image_id,)),
                      Example(caption, None, 0, (train[other + (other >= k)].image_id,))]
    every = [Example(caption, None, int(i == j), (image.image_id,))
             for i, image in enumerate(test) for j, owner in enumerate(test) for caption in owner.captions]
    return {"train": pairs, "valid": every}


def read_nlvr2_task(folder: Path, problems: ProblemLog, fc: FinetuneConfig) -> dict[str, list[Example]]:
    """NLVR²'s train and dev statements, each after its two images."""
    return {split: [Example(it.sentence, None, int(it.label), it.images)
                    for it in vl_data.read_nlvr2(folder / name, problems)] for split, name in NLVR2_FILES.items()}


TASKS: Registry[FinetuneTask] = Registry("fine-tuning task")
for _task in (
    FinetuneTask("boolq", ("question",), ("passage",), big_batch=True),
    FinetuneTask("cola", ("sentence",)),
    FinetuneTask("mnli", ("premise",), ("hypothesis",), num_labels=3, metrics=("accuracy",)),
    FinetuneTask("mrpc", ("sentence1",), ("sentence2",), metric_for_valid="f1"),
    FinetuneTask("multirc", ("question", "answer"), ("paragraph",), "Question: {} Answer: {}", big_batch=True),
    FinetuneTask("qnli", ("question",), ("sentence",)),
    FinetuneTask("qqp", ("question1",), ("question2",), metric_for_valid="f1"),
    FinetuneTask("rte", ("sentence1",), ("sentence2",)),
    FinetuneTask("sst2", ("sentence",)),
    FinetuneTask("wsc", ("span2_text", "span1_text"), ("text",), 'Does "{}" refer to "{}" in this passage?',
             long_schedule=True),
    FinetuneTask("ft_vqa", num_labels=0, metrics=("vqa_score", "accuracy"), metric_for_valid="vqa_score", family="",
                 reader=read_vqa_task),
    FinetuneTask("ft_nlvr2", metrics=("accuracy",), family="", reader=read_nlvr2_task),
    FinetuneTask("ft_retrieval", metrics=("r_mean", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"),
                 metric_for_valid="r_mean", family="", reader=read_retrieval_task),
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


def read_split(task: FinetuneTask, path: Path, problems: ProblemLog) -> list[Example]:
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


def read_task(task: FinetuneTask, folder: Path, problems: ProblemLog,
              fc: FinetuneConfig | None = None) -> dict[str, list[Example]]:
    """Both splits of a task; a split file that is missing or has no usable line stops here, before any training."""
    if task.reader is not None:
        splits = task.reader(folder, problems, fc or FinetuneConfig())
        empty = [s for s in SPLITS if not splits.get(s)]
        if empty:
            raise VlmergeError(f"{folder}: no usable {task.name} examples in its {empty[0]} split")
        return splits
    splits = {}
    for split in SPLITS:
        splits[split] = read_split(task, split_file(folder, task.name, split), problems)
        if not splits[split]:
            raise VlmergeError(f"{split_file(folder, task.name, split)}: no usable {task.name} examples")
    return splits
