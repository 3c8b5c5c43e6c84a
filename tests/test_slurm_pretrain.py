"""`sbatch jobs/pretrain.sbatch` on the real local Slurm: a run finishes; a requeued one resumes."""

import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import FAST_TRAIN, REPO, SMALL_WORLD
from slurm_cluster import job_info, slurm_env
from vlmerge.layout import list_checkpoints

SCRIPT = REPO / "jobs" / "pretrain.sbatch"


def job_args(root: Path) -> list[str]:
    return ["configs/demo.yaml", "text", f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_requeued_pretrain_job_resumes_and_ends_with_the_same_weights(slurm_cluster, fresh_root, request):
    requeued = fresh_root()
    out = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={requeued}/slurm-%j.out", str(SCRIPT),
         *job_args(requeued)],
        capture_output=True, text=True, env=slurm_env(), check=True,
    )
    job = out.stdout.strip().split(";")[0]
    metrics = requeued / "runs/demo/text/metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 10, 180, "training to start")
    subprocess.run(["scontrol", "requeue", job], env=slurm_env(), check=True)
    # Slurm holds a requeued job back for two minutes (BeginTime); an operator may release it.
    wait_until(lambda: (job_info(job) or [{}])[0].get("JobState") == "PENDING", 120, "the job to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env(), check=True)

    def finished() -> bool:
        info = job_info(job)
        return bool(info) and info[0].get("JobState") == "COMPLETED"

    wait_until(finished, 300, f"job {job} to run again and complete")
    assert int(job_info(job)[0]["Restarts"]) >= 1
    log = next(requeued.glob("slurm-*.out")).read_text()
    assert "stopped by a signal" in log, log[-2000:]

    # The reference: the same run trained without interruption (`vlmerge train`, one process), asked
    # for only now: another test worker may be training it while the job runs.
    reference = list_checkpoints(request.getfixturevalue("twins") / "runs/demo/text")
    resumed = list_checkpoints(requeued / "runs/demo/text")
    assert [c.name for c in resumed] == [c.name for c in reference]
    for a, b in zip(resumed, reference):
        ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in tb), a.name
