"""Lock files that hold on NFS too: one holder at a time, and a dead holder's lock taken over.

A lock is a file created with O_CREAT | O_EXCL (atomic on local file systems and NFSv3+, where
`flock` may do nothing or lock only one node's processes) that holds JSON
`{host, pid, started, what, token, job, start}`. Removing the file releases it.

Stale rule (who may take a lock over):
- a holder that was an earlier start of this very Slurm job (its job id, a lower
  SLURM_RESTART_COUNT) is dead wherever it ran: Slurm ends a job's every process before it starts
  the job again, after a requeue or a lost node, whose host can never refresh the lock again;
- a holder on this host is dead when its pid is (or the pid now belongs to a process started
  after the lock was last touched: a reused pid);
- a holder on another host cannot be looked up: it is dead once the lock file's mtime is
  `STALE_AFTER_S` old. A live holder refreshes the mtime every `REFRESH_S` (a thread of `hold`),
  so only a holder whose machine or process is gone lets it age. The margin covers NFS attribute
  caching (about a minute) and clock skew between nodes (Slurm's munge already needs clocks
  within minutes); a requeued job that lands on another node sooner is refused with one line;
- a lock whose content cannot be read (a holder killed between creating and writing it, or an
  empty lock file of an older vlmerge) is judged like another host's.

Removing a lock (taking over a stale one, releasing one's own) is "check it is still the lock I
judged, then unlink it", done under a short-lived guard file beside it (`<lock>.guard`, O_EXCL as
well): of several processes that judged the same stale lock, one removes it and the others find a
new holder's lock, which nobody removes. A guard whose remover was killed is stale by the same
rule (on another host after `_GUARD_STALE_S`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.io import HOST, writer_gone

STALE_AFTER_S = 600.0  # another host's lock untouched for this long is stale
REFRESH_S = 60.0  # a holder touches its lock this often
_POLL_S = 0.1  # between tries while waiting for a holder to let go
_WRITING_S = 5.0  # an unreadable lock younger than this is still being written by its holder
_UNKNOWN_HOST = "?"  # never a host's name (`vlmerge.io.HOST` has no '?'): judged as another host's
_GUARD = ".guard"  # suffix of the guard file beside a lock
_GUARD_STALE_S = 30.0  # a guard is held for a moment: another host's this old was left by a killed process


def _holder(path: Path) -> dict | None:
    """The lock's record; {} when it cannot be read (being written, damaged); None when it is gone."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _stale(path: Path, holder: dict, foreign_after_s: float = STALE_AFTER_S, job: tuple[str, int] = ("", 0)) -> bool:
    """The stale rule of the module's docstring."""
    if job[0] and holder.get("job") == job[0] and isinstance(holder.get("start"), int) and holder["start"] < job[1]:
        return True
    host, pid = holder.get("host"), holder.get("pid")
    if not isinstance(host, str) or not isinstance(pid, int):  # unreadable: judged by its age
        host, pid = _UNKNOWN_HOST, 0
    return writer_gone(path, host, pid, foreign_after_s)


@contextlib.contextmanager
def _guarded(path: Path) -> Iterator[None]:
    """The guard of lock `path` for a moment: one process at a time checks and removes the lock."""
    guard = path.with_name(path.name + _GUARD)
    while not _try_create(guard, {"host": HOST, "pid": os.getpid()}):
        holder = _holder(guard)
        if holder is not None and _stale(guard, holder, _GUARD_STALE_S):  # its remover was killed
            guard.unlink(missing_ok=True)
        time.sleep(_POLL_S / 10)
    try:
        yield
    finally:
        guard.unlink(missing_ok=True)


def _remove_if_same(path: Path, holder: dict, *, stale: bool, job: tuple[str, int] = ("", 0)) -> None:
    """Remove lock `path` if it still holds `holder` (and, with `stale`, is still stale)."""
    with _guarded(path):
        if _holder(path) == holder and (not stale or _stale(path, holder, job=job)):
            path.unlink()


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _describe(path: Path, holder: dict) -> str:
    if not holder.get("host"):
        return f"an unknown holder (the file holds no host and pid; touched {_age(path):.0f} s ago)"
    return (f"{holder.get('what') or 'another process'} on host {holder['host']}, pid {holder.get('pid')}, "
            f"since {holder.get('started', '?')}")


def _refresh(path: Path, token: str, done: threading.Event) -> None:
    """Touch the lock every REFRESH_S while this process holds it (other hosts see it alive)."""
    while not done.wait(REFRESH_S):
        if (_holder(path) or {}).get("token") == token:
            with contextlib.suppress(OSError):
                os.utime(path)


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())  # on NFS: other nodes read the holder, not an empty file
    except BaseException:  # a full disk: no empty lock stays to block the next try
        path.unlink(missing_ok=True)
        raise
    return True


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, *, wait: float | None = 0.0,
         job: tuple[str, int] = ("", 0)) -> Iterator[Path]:
    """Hold the lock file `path` for the block (`what`: who holds it, for others' messages).

    A live holder is waited for up to `wait` seconds (None: as long as it takes), then refused with
    a one-line VlmergeError naming the lock file and its holder. A stale lock is taken over. `job`:
    this process's Slurm job id and start (`vlmerge.launch` knows them; ("", 0) outside Slurm).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    record = {"host": HOST, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what,
              "token": token, "job": job[0], "start": job[1]}
    deadline = None if wait is None else time.monotonic() + wait
    told = False
    while not _try_create(path, record):
        holder = _holder(path)
        if holder is None:
            continue  # released meanwhile: try again at once
        if not holder and _age(path) < _WRITING_S:  # its holder is writing it: wait to read who it is
            time.sleep(_POLL_S)
            continue
        if _stale(path, holder, job=job):
            _remove_if_same(path, holder, stale=True, job=job)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise VlmergeError(f"{path}: locked by {_describe(path, holder)}; {what} cannot run beside it "
                               f"(a dead holder's lock is taken over: at once on its host, from another host "
                               f"once untouched for {STALE_AFTER_S / 60:.0f} min)")
        if not told:
            print(f"{what}: waiting for {path}, held by {_describe(path, holder)}", file=sys.stderr)
            told = True
        time.sleep(_POLL_S)
    done = threading.Event()
    refresher = threading.Thread(target=_refresh, args=(path, token, done), daemon=True, name=f"lock {path.name}")
    refresher.start()
    try:
        yield path
    finally:
        done.set()
        refresher.join()
        _remove_if_same(path, record, stale=False)
