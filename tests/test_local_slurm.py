"""vlmerge's single-node Slurm (slurm/local-cluster.sh): the config it writes, and that `up` is idempotent.

Slurm itself (sbatch, arrays, srun) is Debian's and is exercised by vlmerge's own jobs in
test_slurm_pretrain.py and test_slurm_sweep.py; these tests check only what our script decides.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from slurm_cluster import (_TAG_PREFIX, CONF, NODES, cancel_jobs_of_dead_sessions, job_info, session_jobs, show_config,
                           slurm_env, wait_for_session_jobs)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    return path


def test_two_one_cpu_jobs_run_side_by_side(slurm_cluster, tmp_path):
    """DefMemPerCPU keeps a job that asks no memory from taking the whole node's."""
    script = write_script(
        tmp_path / "pair.sh",
        # Each job announces itself, then waits (bounded) for the other: they must overlap.
        'touch "$1/$2"; for _ in $(seq 100); do [ -e "$1/$3" ] && exit 0; sleep 0.2; done; exit 1\n',
    )
    procs = [
        subprocess.Popen(
            ["sbatch", "--parsable", "--wait", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
             str(script), str(tmp_path), me, other],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm_env(),
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results


def test_config_is_the_generated_one(slurm_cluster):
    conf = CONF.read_text()
    expected = re.search(r"^MaxArraySize=(\d+)$", conf, re.MULTILINE).group(1)
    config = show_config()
    assert config["MaxArraySize"] == expected
    assert config["ClusterName"] == "vlmerge-local"
    assert config["SelectTypeParameters"] == "CR_CORE_MEMORY"
    assert config["ProctrackType"] == "proctrack/linuxproc"
    assert Path("/etc/slurm/slurm.conf").resolve() == CONF.resolve()


def test_up_is_idempotent_and_quick(slurm_cluster):
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "slurm/local-cluster.sh", "up", "--nodes", str(NODES)], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1], env=slurm_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "already up" in proc.stdout
    assert time.monotonic() - start < 15


def _held_job(tmp_path: Path, *options: str) -> str:
    return subprocess.run(["sbatch", "--parsable", "--hold", f"--output={tmp_path}/%j.out", *options, "--wrap=true"],
                          capture_output=True, text=True, env=slurm_env(), check=True).stdout.strip()


def test_tests_wait_on_their_own_jobs_and_cancel_those_of_dead_sessions(slurm_cluster, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = _held_job(tmp_path, "--job-name=vlmerge-sweep", f"--comment={_TAG_PREFIX}{dead.pid}")
    users = _held_job(tmp_path, "--job-name=vlmerge-sweep")  # a user's own job of the same name, untagged
    try:
        cancel_jobs_of_dead_sessions()
        assert job_info(stale)[0]["JobState"] == "CANCELLED"
        assert job_info(users)[0]["JobState"] == "PENDING"
        assert users not in session_jobs()
        wait_for_session_jobs(5)  # returns at once: the pending job of the same name is not this session's
    finally:
        subprocess.run(["scancel", stale, users], env=slurm_env(), check=True)
