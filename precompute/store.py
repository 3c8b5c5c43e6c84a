"""The HDF5 feature store (docs/architecture.md, "Feature store") and its resumable shards.

A shard is created whole (temp name, then rename) with every dataset allocated up front, so
that filling it only overwrites raw bytes in place: a run killed at any point leaves a shard
that opens, and whose `done` rows are exactly the rows whose features were written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path

STR = h5py.string_dtype("utf-8")
COPY_ROWS = 1 << 16  # rows per block when joining shards (bounded memory)


def _chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    return max(1, (1 << 20) // (math.prod(row_shape) * itemsize))  # about 1 MiB per chunk


def create_shard(path: Path, ids: list[str], row_shape: tuple[int, ...], dtype: str, attrs: dict) -> None:
    """Write an empty shard for `ids` (one row of `row_shape` each: [D], or [G², D] for a grid):
    zero features, nothing done, all space allocated."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image_ids", data=np.array(ids, dtype=object), dtype=STR)
        # Writing the zeros allocates the contiguous storage now, not on first write.
        f.create_dataset("features", data=np.zeros((len(ids), *row_shape), dtype=dtype), track_times=False)
        f.create_dataset("done", data=np.zeros(len(ids), dtype=bool), track_times=False)
        f.attrs.update(attrs)
        f.attrs["complete"] = False


class Shard:
    """An open shard: read what is done, write batches of rows, finish with failures."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = h5py.File(path, "r+")
        except OSError as e:
            raise VlmergeError(f"{path}: cannot open the feature shard ({e}); delete it to start it again") from None

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs["complete"])

    def attr(self, key: str):
        return self.file.attrs.get(key)

    def ids(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.file["image_ids"][:]]

    def done(self) -> np.ndarray:
        return self.file["done"][:]

    def write(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Store features for `rows` (increasing), then mark them done; each step reaches the OS."""
        self.file["features"][rows] = features.astype(self.file["features"].dtype, copy=False)
        self.file.flush()
        self.file["done"][rows] = True
        self.file.flush()

    def finish(self, failures: list[tuple[str, str]]) -> None:
        """Record the failed images and mark the shard complete."""
        if "failures" in self.file:
            del self.file["failures"]
        g = self.file.create_group("failures")
        g.create_dataset("image_id", data=np.array([i for i, _ in failures], dtype=object), dtype=STR)
        g.create_dataset("error", data=np.array([e for _, e in failures], dtype=object), dtype=STR)
        self.file.attrs["complete"] = True
        self.file.flush()

    def failures(self) -> list[tuple[str, str]]:
        if "failures" not in self.file:
            return []
        g = self.file["failures"]
        return list(zip(g["image_id"].asstr()[:], g["error"].asstr()[:], strict=True))

    def done_blocks(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, features) of the done rows, block by block."""
        ids, done = np.array(self.ids(), dtype=object), self.done()
        for start in range(0, len(ids), COPY_ROWS):
            sel = done[start : start + COPY_ROWS]
            if sel.any():
                block = self.file["features"][start : start + len(sel)]
                yield list(ids[start : start + len(sel)][sel]), block[sel]


def link(
    shard_paths: list[Path], out: Path, expected_ids: list[str], null_feature: np.ndarray, attrs: dict
) -> tuple[int, int]:
    """Join complete shards into one store at `out`; every expected id must be stored or failed, once.

    Returns (images stored, failures). The caller removes the shards' folder once `out` is in place.
    """
    stored: list[str] = []
    failures: list[tuple[str, str]] = []
    for path in shard_paths:
        if not path.is_file():
            raise VlmergeError(f"{path}: shard missing; run its precompute task first")
        with Shard(path) as s:
            if not s.complete:
                raise VlmergeError(f"{path}: shard incomplete ({int(s.done().sum())}/{len(s.ids())} done); run it again")
            stored += [i for i, d in zip(s.ids(), s.done(), strict=True) if d]
            failures += s.failures()
            row_shape, dtype = s.file["features"].shape[1:], s.file["features"].dtype
    _check_coverage(stored, [i for i, _ in failures], expected_ids)

    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        n = len(stored)
        rows = min(max(n, 1), _chunk_rows(row_shape, dtype.itemsize))
        feats = f.create_dataset("features", shape=(n, *row_shape), dtype=dtype, chunks=(rows, *row_shape))
        row = 0
        for path in shard_paths:
            with Shard(path) as s:
                for ids, block in s.done_blocks():
                    feats[row : row + len(ids)] = block
                    row += len(ids)
        f.create_dataset("image_ids", data=np.array(stored, dtype=object), dtype=STR)
        f.create_dataset("done", data=np.ones(n, dtype=bool))
        f.create_dataset("null_feature", data=null_feature.astype(dtype))
        g = f.create_group("failures")
        g.create_dataset("image_id", data=np.array([i for i, _ in failures], dtype=object), dtype=STR)
        g.create_dataset("error", data=np.array([e for _, e in failures], dtype=object), dtype=STR)
        f.attrs.update(attrs)
        f.attrs["num_images"] = n
        f.attrs["num_failures"] = len(failures)
    return len(stored), len(failures)


def _check_coverage(stored: list[str], failed: list[str], expected: list[str]) -> None:
    seen: set[str] = set()
    for i in stored + failed:
        if i in seen:
            raise VlmergeError(f"image id {i!r} appears more than once across shards")
        seen.add(i)
    missing = [i for i in expected if i not in seen]
    if missing:
        raise VlmergeError(f"{len(missing)} image ids are missing from the shards (first: {missing[0]!r})")
    extra = len(seen) - len(expected)
    if extra:
        raise VlmergeError(f"the shards hold {extra} image ids that the manifests do not list")


def read_store(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, features [N, D] or [N, G², D], null feature [D] or [G², D]) of a linked store."""
    with h5py.File(path, "r") as f:
        return list(f["image_ids"].asstr()[:]), f["features"][:], f["null_feature"][:]
