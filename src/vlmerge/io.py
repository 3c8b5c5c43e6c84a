"""Atomic file and directory writes: every output appears complete or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError

_HASH_BLOCK = 1 << 24  # bytes per read when hashing a file
# `.<name>.tmp-<host>-<pid>-<8 hex>` (older versions wrote no host): the only names cleanup removes.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9._-]+)-)?(?P<pid>\d+)-[0-9a-f]{8}")
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"  # as it appears in names and locks
# A temp file of another machine (a shared file system) is only removed once nobody touched it
# for this long: its writer's process cannot be looked up from here.
FOREIGN_TEMP_STALE_S = 6 * 3600
_CLOCK_SLACK_S = 2.0  # boot time is known to the second: a process start time is this uncertain


def temp_sibling(path: Path) -> Path:
    """A fresh temp name beside `path`, naming this host and process (see `remove_stale_temps`)."""
    # Same directory as the target, so the final rename never crosses filesystems.
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), where Linux tells it; else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def writer_gone(path: Path, host: str | None, pid: int, foreign_after_s: float) -> bool:
    """True when the process (`host`, `pid`) that wrote `path` has ended.

    On this host (or no host named) its pid is dead, or now belongs to a process that started after
    `path` was last written (a reused pid). Another host's processes cannot be looked up from here:
    there it is gone once nobody touched `path` for `foreign_after_s` (a live writer may refresh its
    mtime to show it is alive).
    """
    try:
        touched = path.lstat().st_mtime
    except FileNotFoundError:
        return False  # gone already: nothing to judge
    if host not in (None, HOST):
        return time.time() - touched > foreign_after_s
    if pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    started = _process_started(pid)
    return started is not None and started > touched + _CLOCK_SLACK_S


def is_stale_temp(path: Path) -> bool:
    """True for a temp name of `temp_sibling` whose writer is gone (this host: its process has ended)."""
    match = _TEMP_NAME.fullmatch(path.name)
    return bool(match) and writer_gone(path, match["host"], int(match["pid"]), FOREIGN_TEMP_STALE_S)


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


def write_failure(e: Exception) -> str:
    """Why a write failed, in a few words: the system's reason (a full disk, a quota, a file size
    limit), also when safetensors reports it in an error of its own."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a log file (created if missing) that is no symbolic link: a link planted in
    its place, a dangling one too, would send the writes outside the output root."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise VlmergeError(f"{path}: is a symbolic link; expected the log file itself (remove the link)") from None
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


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


def same_record(path: str | os.PathLike, record: dict, keys: Iterable[str] | None = None) -> bool:
    """Whether the JSON record at `path` (what an output folder holds: a merge, an evaluation) exists and
    agrees with `record` on `keys` (default: all of them); an unreadable record agrees with nothing."""
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and all(old.get(k) == record[k] for k in (record if keys is None else keys))


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
