"""The results datasets (DESIGN.md, "Results"): one row per (model, task, subtask, metric), and
per-item scores beside them; Parquet, written atomically, with a fixed schema."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmerge import code_version
from vlmerge.io import atomic_path, fingerprint

MODEL_FIELDS = [("experiment", pa.string()), ("item_id", pa.string()), ("text_run", pa.string()),
                ("mm_run", pa.string()), ("text_words", pa.int64()), ("mm_words", pa.int64()),
                ("method", pa.string()), ("alpha", pa.float64()), ("method_params", pa.string())]
RESULTS_SCHEMA = pa.schema(MODEL_FIELDS + [
    ("task", pa.string()), ("subtask", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
    ("n", pa.int64()), ("code_version", pa.string()), ("config_hash", pa.string()), ("slurm_job_id", pa.string()),
    ("created_at", pa.string()),
])
ITEMS_SCHEMA = pa.schema(MODEL_FIELDS + [
    ("task", pa.string()), ("subtask", pa.string()), ("example_id", pa.string()), ("value", pa.float64()),
])
DISTANCES_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("text_run", pa.string()), ("mm_run", pa.string()), ("text_words", pa.int64()),
    ("mm_words", pa.int64()), ("space", pa.string()), ("scope", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()),
])


def checkpoint_run(path: Path) -> dict[str, Any]:
    """experiment, run and words seen of a run checkpoint, from its path and trainer_state.json."""
    state_path = path / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    is_run = path.parent.name == "checkpoints"
    return {
        "experiment": path.parents[2].name if is_run else "",
        "run": state.get("run") or (path.parents[1].name if is_run else path.name),
        "words": state.get("words_seen"),
    }


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which model a row is about: a merge of a pair, or one unmerged twin (method 'none')."""

    experiment: str = ""
    text_run: str = ""
    mm_run: str = ""
    text_words: int | None = None
    mm_words: int | None = None
    method: str = "none"
    alpha: float | None = None
    method_params: str = "{}"

    @classmethod
    def of_directory(cls, path: Path) -> ModelInfo:
        """From a merge's merge.json, a run checkpoint's trainer_state.json, or nothing (foreign)."""
        record_path = path / "merge.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            info = cls.of_pair(checkpoint_run(Path(record["inputs"]["text"]["path"])),
                               checkpoint_run(Path(record["inputs"]["mm"]["path"])),
                               record["method"], json.dumps(record["params"], sort_keys=True))
            return dataclasses.replace(info, alpha=record["alpha"])
        if (path / "trainer_state.json").is_file():
            return cls.unmerged(checkpoint_run(path))
        return cls(text_run=path.name, method="none")

    @classmethod
    def of_pair(cls, text: dict[str, Any], mm: dict[str, Any], method: str, params: str) -> ModelInfo:
        """A merge of two run checkpoints (see checkpoint_run); α is set per row."""
        return cls(text["experiment"] or mm["experiment"], text["run"], mm["run"], text["words"], mm["words"],
                   method, None, params)

    @classmethod
    def unmerged(cls, run: dict[str, Any]) -> ModelInfo:
        """A twin on its own: α = 1 for the text run, α = 0 for the multimodal one."""
        if run["run"] == "text":
            return cls(run["experiment"], text_run="text", text_words=run["words"], alpha=1.0)
        return cls(run["experiment"], mm_run=run["run"], mm_words=run["words"], alpha=0.0)

    def columns(self, item_id: str) -> dict[str, Any]:
        return {"item_id": item_id, **dataclasses.asdict(self)}


def stamp(config_hash: str = "") -> dict[str, str]:
    """The provenance columns of a result row."""
    return {"code_version": code_version(), "config_hash": config_hash,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_rows(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write rows as one Parquet file with `schema`, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


KEY = ["experiment", "item_id", "text_run", "mm_run", "text_words", "mm_words", "method", "alpha", "method_params",
       "task", "subtask", "metric"]


def _read(files: list[Path], schema: pa.Schema) -> pd.DataFrame:
    """Parquet files as one frame; integer columns stay integers with nulls (pandas Int64)."""
    tables = [pq.read_table(f, schema=schema) for f in files] or [schema.empty_table()]
    return pa.concat_tables(tables).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def read_results(folder: Path) -> pd.DataFrame:
    """Every results file of a folder as one frame, one row per key (the newest wins)."""
    frame = _read(sorted(folder.glob("*.parquet")), RESULTS_SCHEMA).sort_values("created_at", kind="stable")
    return frame.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def compact(folder: Path, schema: pa.Schema = RESULTS_SCHEMA) -> tuple[int, int]:
    """Merge a folder's part files into one `compact-<hash>.parquet` without duplicate keys.

    The compacted file is renamed into place before the parts are removed, so a crash loses
    nothing; readers drop the duplicates they might see meanwhile. Returns (files, rows).
    """
    files = sorted(folder.glob("*.parquet"))
    if len(files) <= 1:
        return len(files), sum(pq.read_metadata(f).num_rows for f in files)
    frame = _read(files, schema)
    key = KEY if schema == RESULTS_SCHEMA else [c for c in KEY if c != "metric"] + ["example_id"]
    if "created_at" in frame:
        frame = frame.sort_values("created_at", kind="stable")
    frame = frame.drop_duplicates(key, keep="last")
    out = folder / f"compact-{fingerprint(sorted(f.name for f in files))[:12]}.parquet"
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), tmp)
    for f in files:
        if f != out:
            f.unlink()
    return len(files), len(frame)


def compacted_item_ids(folder: Path) -> set[str]:
    """Work items recorded in a folder's compacted files (they no longer have files of their own)."""
    return {i for f in folder.glob("compact-*.parquet") for i in pq.read_table(f, columns=["item_id"]).column(0).to_pylist()}
