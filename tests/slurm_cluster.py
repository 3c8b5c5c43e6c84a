"""The real Slurm of slurm/local-cluster.sh, for tests: start it, submit, inspect.

It has two nodes, each in its own network namespace (one where namespaces are not allowed:
`two_nodes` then skips the tests that need two).

Use from any test module::

    from slurm_cluster import ensure_cluster, job_info

    @pytest.fixture(scope="module")
    def slurm_cluster():
        ensure_cluster()

The cluster is left up after the tests (`up` is idempotent, so the next module or the next
session reuses it); `bash slurm/local-cluster.sh down` stops it. Nothing here fakes Slurm:
tests/conftest.py skips these tests where Slurm or root is missing (and fails them in CI).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
STATE_DIR = Path(os.environ.get("VLMERGE_SLURM_DIR", "/tmp/vlmerge-slurm"))
CONF = STATE_DIR / "slurm.conf"
# This test session's tag (jobs/submit.sh puts VLMERGE_JOB_TAG in each job's comment): tests wait on
# their own jobs, never on a user's or a killed earlier session's jobs of the same names.
_TAG_PREFIX = f"vlmerge-test-{socket.gethostname()}-"
SESSION_TAG = f"{_TAG_PREFIX}{os.getpid()}"


NODES = 2


def ensure_cluster(timeout: float = 180) -> None:
    """Start the local cluster unless it is up already (a crashed node's slurmd is started again);
    fail the calling test if it cannot."""
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "up", "--nodes", str(NODES)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=slurm_env(),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{SCRIPT} up` did not finish within {timeout} s:\n{exc.stdout}\n{exc.stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`bash {SCRIPT} up` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    # /etc/slurm/slurm.conf links to CONF already; this also wins over a stale SLURM_CONF in the
    # caller's environment, for every Slurm client this process starts (submitit included).
    os.environ["SLURM_CONF"] = str(CONF)
    cancel_jobs_of_dead_sessions()


def node_names() -> list[str]:
    """The cluster's nodes."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, env=slurm_env(),
                         timeout=30, check=True)
    return sorted(set(out.stdout.split()))


def _queue() -> list[tuple[str, str]]:
    """(job id, comment) of every queued or running job."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, env=slurm_env(),
                         timeout=30, check=True)
    return [tuple(line.split("|", 1)) for line in out.stdout.splitlines()]


def cancel_jobs_of_dead_sessions() -> None:
    """Cancel the jobs that a killed test session of this host left queued (their tag names its pid)."""
    stale = [job for job, tag in _queue()
             if tag.startswith(_TAG_PREFIX) and tag[len(_TAG_PREFIX):].isdigit()
             and not Path(f"/proc/{tag[len(_TAG_PREFIX):]}").exists()]
    if stale:
        subprocess.run(["scancel", *stale], env=slurm_env(), timeout=30, check=True)


def session_jobs() -> list[str]:
    """The ids of this test session's queued or running jobs."""
    return [job for job, tag in _queue() if tag == SESSION_TAG]


def wait_for_session_jobs(timeout: float) -> None:
    """Wait until every job this test session submitted has left the queue."""
    deadline = time.time() + timeout
    while session_jobs():
        if time.time() > deadline:
            raise AssertionError(f"this session's jobs still queued after {timeout} s: {session_jobs()}")
        time.sleep(2)


def slurm_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a Slurm client, plus `env`.

    SLURM_* variables are dropped (a test run inside a Slurm job would otherwise submit into that
    job's allocation), except SLURM_CONF, which points at the local cluster's configuration. The
    session's tag marks every job that jobs/*.sh submit.
    """
    out = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if CONF.is_file():
        out["SLURM_CONF"] = str(CONF)
    out["VLMERGE_JOB_TAG"] = SESSION_TAG
    out.update(env or {})
    return out


def job_info(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as one dict per record (an array gives one per task); [] once purged
    (MinJobAge after the job ended)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=slurm_env(), timeout=30
    )
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        # Values may hold spaces (Command=..., paths); split on " Key=" boundaries only.
        records.append(dict(re.findall(r"(?:^|\s)([A-Za-z:/]+)=(.*?)(?=\s[A-Za-z:/]+=|$)", line.strip())))
    return records


def show_config() -> dict[str, str]:
    """`scontrol show config` as a dict (keys as printed, e.g. MaxArraySize)."""
    proc = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, env=slurm_env(), timeout=30, check=True
    )
    pairs = (line.split("=", 1) for line in proc.stdout.splitlines() if " = " in line)
    return {k.strip(): v.strip() for k, v in pairs}
