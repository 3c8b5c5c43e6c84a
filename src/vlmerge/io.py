"""Atomic file and directory writes: every output appears complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError

_HASH_BLOCK = 1 << 24  # bytes per read when hashing a file
# `.<name>.tmp-<host>-<pid>-<8 hex>` (older versions wrote no host): the only names cleanup removes.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9._-]+)-)?(?P<pid>\d+)-[0-9a-f]{8}")
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
# A temp file of another machine (a shared file system) is only removed once nobody touched it
# for this long: its writer's process cannot be looked up from here.
FOREIGN_TEMP_STALE_S = 6 * 3600


def temp_sibling(path: Path) -> Path:
    """A fresh temp name beside `path`, naming this host and process (see `remove_stale_temps`)."""
    # Same directory as the target, so the final rename never crosses filesystems.
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """True for a temp name of `temp_sibling` whose writer is gone (this host: its process has ended)."""
    match = _TEMP_NAME.fullmatch(path.name)
    if not match:
        return False
    if match["host"] in (None, _HOST):
        return int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_TEMP_STALE_S
    except FileNotFoundError:
        return False


def remove_stale_temps(*folders: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders that killed writers left directly in `folders`; return them.

    Only names of `temp_sibling` whose writer is gone are touched: a user's own files, and the
    temp files of writers still running (a concurrent array task), stay.
    """
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if is_stale_temp(p):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def link_inside(target: Path, link: Path) -> None:
    """Make `link` a symlink to `target` by a relative path, so that a folder moved or copied as a whole
    (`cp -a`) keeps its links inside itself; a dangling link there (its folder moved) is replaced."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and not link.exists():
        link.unlink()
    os.symlink(os.path.relpath(target, link.parent), link)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (other threads create files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _respect_umask(path: Path) -> None:
    """Give what a writer created (some create 0600 files) the modes the user's umask allows."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A file replaces an existing file. A directory is renamed into place only when `path` does
    not exist yet (an existing complete directory is never half-overwritten).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if tmp.exists():
            _respect_umask(tmp)
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
        probe = temp_sibling(root / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise VlmergeError(f"{root}: output root is not writable ({e.strerror or e})") from None
    return root


def check_creatable(path: str | os.PathLike) -> None:
    """Prove that the folder `path` can be written (or created) later, without creating anything; else one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VlmergeError(f"{path}: is a file; expected a folder to write into")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise VlmergeError(f"{path}: {base} is a file; expected a folder")
    probe = temp_sibling(base / "probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise VlmergeError(f"{path}: not writable ({base}: {e.strerror or e})") from None


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description of what determines an output.

    Paths go in as `Layout.relative` gives them (root-relative inside the output root), so that a moved
    or copied root keeps its fingerprints.
    """
    canon = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# (path, size, mtime_ns, inode, ctime_ns) -> sha256, for this process. No hash is ever kept beside a
# file: a `<file>.sha256` that someone left there (stale, copied or planted) cannot be told from ours
# by size and mtime, which `cp -p`, `rsync -t` and `touch -r` keep, and a record must name the bytes
# that were read. A rewrite of the file changes its ctime, which no one can set back.
_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process while the file stays the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]
