"""The results datasets (docs/architecture.md, "Results"): one row per (model, task, subtask, metric), and
per-item scores beside them; Parquet, written atomically, with a fixed schema."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmerge import code_version
from vlmerge.io import atomic_path, fingerprint, remove_stale_temps
from vlmerge.layout import compact_files, compact_lock, compact_name, result_dataset_dir, result_file, result_files
from vlmerge.locks import hold
from vlmerge.modelkey import CHECKPOINT_PAIR, MM_ALPHA, MODEL, PAIR, TEXT_ALPHA, UNMERGED, ModelKey, checkpoint_run

__all__ = ["CHECKPOINT_PAIR", "MM_ALPHA", "MODEL", "PAIR", "TEXT_ALPHA", "UNMERGED", "ModelKey", "checkpoint_run"]

MODEL_FIELDS = [("experiment", pa.string()), ("item_id", pa.string()), ("text_run", pa.string()),
                ("mm_run", pa.string()), ("text_words", pa.int64()), ("mm_words", pa.int64()),
                ("method", pa.string()), ("alpha", pa.float64()), ("method_params", pa.string()),
                ("study", pa.string())]
LOWER_IS_BETTER = {"perplexity", "loss"}  # metrics where a lower value is the better score
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
    ("value", pa.float64()), ("study", pa.string()),
])


def stamp(config_hash: str = "", job_id: str = "") -> dict[str, str]:
    """The provenance columns of a result row (job_id: the Slurm job's, from `vlmerge.launch`)."""
    return {"code_version": code_version(), "config_hash": config_hash, "slurm_job_id": job_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_rows(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write rows as one Parquet file with `schema`, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# The key of one row of each dataset: a rerun's rows replace the older ones with the same key.
DEDUPE = {
    "metrics": [*MODEL, "task", "subtask", "metric"],
    "items": [*MODEL, "task", "example_id"],
    "distances": [*CHECKPOINT_PAIR, "space", "scope", "metric"],
}
SCHEMAS = {"metrics": RESULTS_SCHEMA, "items": ITEMS_SCHEMA, "distances": DISTANCES_SCHEMA}


def newest_rows(frame: pd.DataFrame, dataset: str, *, per_item: bool = False) -> pd.DataFrame:
    """One row per key of `dataset` (and per work item, with `per_item`), the newest winning."""
    if "created_at" in frame:
        frame = frame.sort_values("created_at", kind="stable")
    key = ["item_id", *DEDUPE[dataset]] if per_item else DEDUPE[dataset]
    return frame.drop_duplicates(key, keep="last").reset_index(drop=True)


def _read(files: list[Path], schema: pa.Schema, filters: list[tuple] | None = None) -> pd.DataFrame:
    """Parquet files as one frame; integer columns stay integers with nulls (pandas Int64)."""
    tables = [pq.read_table(f, schema=schema, filters=filters) for f in files] or [schema.empty_table()]
    return pa.concat_tables(tables).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def read_results(results_dir: Path) -> pd.DataFrame:
    """Every metrics file of `results/<exp>` as one frame, one row per key (the newest wins)."""
    return newest_rows(_read(result_files(results_dir, "metrics"), RESULTS_SCHEMA), "metrics", per_item=True)


def read_item_scores(results_dir: Path, task: str) -> pd.DataFrame:
    """The per-item scores of one task in `results/<exp>`, one row per key (the last file read wins)."""
    frame = _read(result_files(results_dir, "items"), ITEMS_SCHEMA, filters=[("task", "=", task)])
    return newest_rows(frame, "items", per_item=True)


def finish_times(results_dir: Path) -> dict[str, str]:
    """When each work item's rows were written (their newest `created_at`), compacted or not; files
    that are not the sweep's (no such columns, not Parquet) are passed over, as `compact` leaves them."""
    times: dict[str, str] = {}
    for f in result_files(results_dir, "metrics"):
        try:
            table = pq.read_table(f, columns=["item_id", "created_at"])
        except (pa.ArrowException, OSError):
            continue
        for item, at in zip(*(table.column(c).to_pylist() for c in ("item_id", "created_at"))):
            if at and at > times.get(item, ""):
                times[item] = at
    return times


def _sweep_item_ids(path: Path, schema: pa.Schema) -> set[str] | None:
    """The work items a Parquet file holds rows of, when it has `schema` exactly; else None (not the sweep's)."""
    try:
        if not pq.read_schema(path).equals(schema):
            return None
        ids = set(pq.read_table(path, columns=["item_id"]).column(0).to_pylist())
    except (pa.ArrowException, OSError):
        return None
    return ids if ids and None not in ids else None


def compact(results_dir: Path, dataset: str, planned: set[str]) -> tuple[int, int, list[Path]]:
    """Merge the sweep's part files of a dataset into one `compact-<hash>.parquet` without duplicate keys.

    Only files that are provably the sweep's take part: the dataset's schema, and rows of
    `planned` work items (or items compacted before) only; any other file is left alone. One
    compaction at a time (a lock file; a second one waits). The compacted file is renamed into
    place before the parts are removed, so a crash loses nothing; readers drop the duplicates
    they might see meanwhile. Returns (files compacted, rows, files left alone).
    """
    schema = SCHEMAS[dataset]
    with hold(compact_lock(results_dir), "results compact", wait=None):
        remove_stale_temps(result_dataset_dir(results_dir, dataset))
        known = planned | compacted_item_ids(results_dir)
        files, foreign = [], []
        for f in result_files(results_dir, dataset):
            ids = _sweep_item_ids(f, schema)
            (files if ids is not None and ids <= known else foreign).append(f)
        if len(files) <= 1:
            return len(files), sum(pq.read_metadata(f).num_rows for f in files), foreign
        frame = newest_rows(_read(files, schema), dataset, per_item=True)
        out = result_file(results_dir, dataset, compact_name(fingerprint(sorted(f.name for f in files))[:12]))
        with atomic_path(out) as tmp:
            pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), tmp)
        for f in files:
            if f != out:
                f.unlink()
    return len(files), len(frame), foreign


def compacted_item_ids(results_dir: Path) -> set[str]:
    """Work items recorded in the compacted metrics files (they no longer have files of their own)."""
    return {i for f in compact_files(results_dir, "metrics") for i in pq.read_table(f, columns=["item_id"]).column(0).to_pylist()}
