"""The sweep on the real local Slurm: jobs/pipeline.sh runs the whole DAG; submitit runs an array."""

import subprocess
import sys

from conftest import FAST_TRAIN, REPO, SMALL_WORLD
from slurm_cluster import session_jobs, slurm_env, wait_for_session_jobs
from vlmerge.config import load_config
from vlmerge.results import DEDUPE, read_results
from vlmerge.sweep.finetune import finetune_plan
from vlmerge.sweep.plan import plan

# One method: an array task per checkpoint pair (what is under test is the launching, not the methods).
SWEEP = [*SMALL_WORLD, *FAST_TRAIN, "sweep.alphas=[0.0, 1.0]", "sweep.methods=[{name: linear}]", "sweep.tasks=[blimp]",
         "eval.batch_size=128"]


def assert_complete(root, overrides) -> None:
    cfg = load_config(None, [f"paths.root={root}", *overrides])
    items = plan(cfg)
    frame = read_results(root / "results/demo")
    tuned = frame.item_id.str.startswith("ft-")  # sweep.finetune's items (demo.yaml fine-tunes the best merges)
    merged = frame[(frame.method != "none") & ~tuned]
    assert set(merged.item_id) == {it.item_id for it in items}
    finetuned = {it.item_id for it in finetune_plan(cfg, items)} if cfg.sweep.finetune else set()
    assert set(frame[tuned].item_id) <= finetuned  # (the submitit array runs the sweep alone)
    assert not frame.duplicated(["item_id", *DEDUPE["metrics"]]).any()


def test_pipeline_sh_runs_the_dag_to_the_end(slurm_cluster, tmp_path):
    # The DAG's wiring, on the smallest run that exercises every job: one epoch, two checkpoints.
    # One CPU per job, so that the two runs (and the array tasks) run side by side on the 2-CPU node.
    root = tmp_path / "root"
    dag = [*SWEEP, "train.epochs=1", "checkpoints.words=[2000]", "train.micro_batch_size=32", "train.log_every=20"]
    r = subprocess.run(["bash", "jobs/pipeline.sh", "configs/demo.yaml", f"paths.root={root}", *dag],
                       cwd=REPO, env=slurm_env({"VLMERGE_SBATCH_ARGS": "--cpus-per-task=1"}),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for_session_jobs(1200)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "logs/demo").glob("*.out")))
    assert (root / "results/demo/metrics").is_dir(), logs
    compacted = list((root / "results/demo/metrics").glob("*.parquet"))
    assert len(compacted) == 1 and compacted[0].name.startswith("compact-"), logs
    assert_complete(root, dag)
    assert (root / "reports/demo/report.html").is_file(), logs  # the DAG's last job


def test_submitit_runs_the_sweep_as_a_slurm_array(slurm_cluster, twins, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    r = subprocess.run([sys.executable, "slurm/sweep.py", "--executor", "slurm", f"paths.root={root}", *SWEEP],
                       cwd=REPO, env=slurm_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "array task(s)" in r.stdout and "item(s) run" in r.stdout
    assert_complete(root, SWEEP)
    assert list((root / "results/demo/submitit").iterdir())


def test_pipeline_sh_dry_run_prints_the_dag_checks_every_job_and_submits_none(slurm_cluster, twins, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)  # trained: the sweep array is sized too
    before = session_jobs()
    r = subprocess.run(["bash", "jobs/pipeline.sh", "--dry-run", "configs/demo.yaml", f"paths.root={root}", *SWEEP],
                       cwd=REPO, env=slurm_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    jobs = [line for line in lines if line.startswith("job ") and ": sbatch" in line]
    # demo-data, tokenizer, corpus, precompute array, link, text, multimodal, the submitter; its sweep array
    # and the fine-tuning submitter
    assert len(jobs) == 10 and "--array=0-0" in jobs[3] and "--dependency=afterok:6:7" in jobs[7]
    assert "--array=0-2%8" in jobs[8] and "--dependency=afterok:8" in jobs[8]
    # demo.yaml fine-tunes chosen merges: a job after the sweep sizes that array (then compaction, analysis)
    assert "--job-name=vlmerge-finetune-submit" in jobs[9] and "--dependency=afterok:9" in jobs[9]
    assert sum("test-only: Job" in line for line in lines) == 10
    assert "sbatch --test-only accepted every one" in r.stdout
    assert session_jobs() == before and not (root / "logs").exists()  # nothing submitted, nothing written

    refused = subprocess.run(["bash", "jobs/pipeline.sh", "--dry-run", "configs/demo.yaml", f"paths.root={root}",
                              *SWEEP, "compute.device=cuda"], cwd=REPO, env=slurm_env(), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1  # the array's --gpus-per-task=1 on a cluster without GPUs
    assert "test-only FAILED" in refused.stderr and "1 of 10 job(s) refused by sbatch --test-only" in refused.stderr


def test_the_estimate_reads_the_partitions_time_limit(slurm_cluster):
    from vlmerge.launch import partition_time_limit

    name, limit = partition_time_limit()  # the local cluster's default partition
    assert name == "debug" and limit is None  # MaxTime=UNLIMITED
    assert partition_time_limit("no-such-partition") is None
