"""Atomic file and directory writes: every output appears complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError

_HASH_BLOCK = 1 << 24  # bytes per read when hashing a file


def _temp_sibling(path: Path) -> Path:
    # Same directory as the target, so the final rename never crosses filesystems.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A file replaces an existing file. A directory is renamed into place only when `path` does
    not exist yet (an existing complete directory is never half-overwritten).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and path.exists():
            raise FileExistsError(f"{path}: already exists; remove it to write it again")
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON file atomically (pretty-printed, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> int:
    """Write an iterable of dicts as JSON lines atomically; return the row count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def check_writable(root: str | os.PathLike) -> Path:
    """Create `root` if needed and prove a file can be written there, or raise a one-line error."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = _temp_sibling(root / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise VlmergeError(f"{root}: output root is not writable ({e.strerror or e})") from None
    return root


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description of what determines an output."""
    canon = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered in `<file>.sha256` beside it while its size and mtime stay the same."""
    side = path.with_name(path.name + ".sha256")
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if side.is_file():
        try:
            cached = json.loads(side.read_text())
            if {k: cached.get(k) for k in stamp} == stamp:
                return cached["sha256"]
        except (ValueError, KeyError):
            pass  # a damaged cache is recomputed
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    try:
        write_json(side, {**stamp, "sha256": h.hexdigest()})
    except OSError:  # a read-only input: no cache, same hash
        pass
    return h.hexdigest()
