"""Read the sweep's datasets (metrics, items, distances) and the runs' training logs.

One results folder is `results/<experiment>` with `metrics/`, `items/` and `distances/` inside
(docs/architecture.md, "Results"); a folder that holds several such folders (`results/`) stands
for all of them. Files that are not results (a foreign or empty Parquet) are left out with a note; a folder
without any Parquet file is an error. Rows are deduplicated on their key (the newest wins), as
`vlmerge.results` defines (`DEDUPE`, the same key the writer's compaction uses).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmerge import layout
from vlmerge.config import EXPERT_RUN
from vlmerge.errors import VlmergeError
from vlmerge.modelkey import EXPERT_DISTANCE_PREFIX, EXPERT_METHOD_PREFIX
from vlmerge.problems import ProblemLog, read_jsonl
from vlmerge.results import CHECKPOINT_PAIR, MODEL, PAIR, SCHEMAS, newest_rows

__all__ = ["CHECKPOINT_PAIR", "MODEL", "PAIR", "NO_WORDS", "Results", "load"]
NO_WORDS = -1  # words seen of the side a twin's row does not have (null in the Parquet)


@dataclasses.dataclass
class Results:
    """The datasets of one or more experiments, and notes on what was left out."""

    metrics: pd.DataFrame
    items: pd.DataFrame
    distances: pd.DataFrame
    training: pd.DataFrame  # run, experiment, words, loss (one row per logged step)
    notes: list[str] = dataclasses.field(default_factory=list)
    # the twins' checkpoints on the best-text data (pairing best_text's best_text.json): experiment, run,
    # words, task, data, accuracy
    best_text: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=BEST_TEXT_COLUMNS))


def experiment_folders(path: Path) -> list[Path]:
    """`path` itself when it holds a `metrics/` folder, else its subfolders that do."""
    if not path.is_dir():
        raise VlmergeError(f"--results {path}: not a folder")
    found = layout.experiment_results_dirs(path)
    if not found:
        raise VlmergeError(f"--results {path}: expected a results folder with metrics/ inside "
                           "(results/<experiment>), or a folder of such folders")
    return found


def read_dataset(files: Sequence[Path], name: str, notes: list[str]) -> pd.DataFrame:
    """Every readable file of one dataset as one frame; foreign and unreadable files become notes."""
    schema = SCHEMAS[name]
    frames = []
    for f in files:
        try:
            columns = set(pq.read_schema(f).names)
            missing = [c for c in schema.names if c not in columns and c not in OPTIONAL]
            if missing:
                notes.append(f"{f}: not a {name} file (missing columns: {', '.join(missing)}); left out")
                continue
            table = pq.read_table(f, columns=[c for c in schema.names if c in columns])
        except (pa.ArrowInvalid, OSError) as e:
            notes.append(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]}); left out")
            continue
        if table.num_rows == 0:
            notes.append(f"{f}: empty; left out")
            continue
        frames.append(table.to_pandas())
    if not frames:
        return _normalise(schema.empty_table().to_pandas())
    return newest_rows(_normalise(pd.concat(frames, ignore_index=True)), name)


# Columns a results file may lack: written before they existed (item_id: by `vlmerge eval`; study:
# before `vlmerge study` recorded its models' identity)
OPTIONAL = ("item_id", "study")


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain key columns: null runs → '', null words → NO_WORDS, so that keys compare and index."""
    if "study" not in frame:
        frame["study"] = ""
    for col in ("text_run", "mm_run", "method_params", "subtask", "study"):
        if col in frame:
            frame[col] = frame[col].fillna("").astype(str)
    for col in ("text_words", "mm_words"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col]).fillna(NO_WORDS).astype("int64")
    if "method_params" in frame:
        frame["method_params"] = frame["method_params"].replace("", "{}")
    return frame


TRAINING_COLUMNS = ["experiment", "run", "words", "loss"]
BEST_TEXT_COLUMNS = ["experiment", "run", "words", "task", "data", "accuracy"]


def read_best_text(folders: Sequence[Path], notes: list[str]) -> pd.DataFrame:
    """Every checkpoint score of each experiment's best_text.json (`vlmerge.sweep.run.best_text_scores`)."""
    rows = []
    for folder in folders:
        path = layout.best_text_cache(folder)
        if not path.is_file():
            continue
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            rows += [{"experiment": folder.name, "run": run, "words": int(score["words"]), "task": str(kept["task"]),
                      "data": str(kept["data"]), "accuracy": float(score["accuracy"])}
                     for run, checkpoints in kept["accuracy"].items() for score in checkpoints.values()]
        except (ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{path}: not the best-text scores of this vlmerge (an older one?); left out")
    return pd.DataFrame(rows, columns=BEST_TEXT_COLUMNS)


def read_training(runs: Path, notes: list[str]) -> pd.DataFrame:
    """The loss curve of every run under `runs/<experiment>` (each run's metrics.jsonl)."""
    rows = []
    logs = (layout.run_metrics_log(run) for run in sorted(runs.iterdir()) if run.is_dir())
    for log in (log for log in logs if log.is_file()):
        problems = ProblemLog()  # lines that are not UTF-8 or not JSON objects
        bad = 0
        for _, rec in read_jsonl(log, problems):
            try:
                rows.append({"experiment": runs.name, "run": log.parent.name, "words": int(rec["words"]),
                             "loss": float(rec["loss"])})
            except (ValueError, KeyError, TypeError):
                bad += 1
        bad += len(problems)
        if bad:
            notes.append(f"{log}: {bad} malformed line(s) left out")
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)


def load(results: Sequence[Path], runs: Sequence[Path] | None = None) -> Results:
    """The datasets of every experiment folder under `results`; training logs from `runs`
    (default: the runs folder beside each results folder, when there is one)."""
    notes: list[str] = []
    folders = [f for path in results for f in experiment_folders(Path(path))]
    files = {name: [f for folder in folders for f in layout.result_files(folder, name)] for name in layout.RESULT_DATASETS}
    if not any(files.values()):
        raise VlmergeError(f"--results {', '.join(map(str, results))}: no Parquet files in metrics/, items/ or distances/")
    frames = {name: read_dataset(files[name], name, notes) for name in layout.RESULT_DATASETS}
    runs = [Path(r) for r in runs] if runs is not None else [r for r in map(layout.runs_dir_of_results, folders) if r.is_dir()]
    logs = [read_training(r, notes) for r in runs]
    training = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=TRAINING_COLUMNS)
    return Results(frames["metrics"], frames["items"], frames["distances"], training, notes,
                   read_best_text(folders, notes))


def twin_results(results: Results) -> Results:
    """The results without Sung et al.'s modality-expert models (their merges, the unmerged expert
    run, the distances between experts), which `vlmerge.analysis.sung` reports."""

    def models(frame: pd.DataFrame) -> pd.DataFrame:
        expert = frame.method.astype(str).str.startswith(EXPERT_METHOD_PREFIX) | (frame.mm_run == EXPERT_RUN)
        return frame[~expert]

    d = results.distances
    return dataclasses.replace(results, metrics=models(results.metrics), items=models(results.items),
                               distances=d[~d.text_run.astype(str).str.startswith(EXPERT_DISTANCE_PREFIX)])
