"""Two real nodes (slurm/local-cluster.sh up --nodes 2, each in its own network namespace):
`jobs/pretrain.sbatch` trains across them over gloo; a job that loses a node resumes on the node
that is left, with half the ranks and the same global batch; and the sweep's array tasks on both
nodes share one results folder."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAIN, REPO, SMALL_WORLD
from slurm_cluster import (SCRIPT as CLUSTER, SESSION_TAG, ensure_cluster, job_info, node_names, slurm_env,
                           wait_for_session_jobs)
from vlmerge.cli import main
from vlmerge.config import load_config
from vlmerge.layout import LATEST, STATE_POSITION, list_checkpoints, result_files, states_dir
from vlmerge.results import DEDUPE
from vlmerge.sweep.plan import plan

PRETRAIN = REPO / "jobs" / "pretrain.sbatch"
# ~250 steps of a global batch of 16 (one micro-batch of 8 on each of two ranks, two on one rank),
# a state every 20 steps: long enough to lose a node in the middle.
TRAIN = [*SMALL_WORLD, "checkpoints.words=[1000, 2000, 5000]", "train.micro_batch_size=8", "train.epochs=10",
         "train.log_every=1", "train.global_batch=16", "checkpoints.state_every_steps=20"]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster) -> list[str]:
    nodes = node_names()
    if len(nodes) < 2:
        pytest.skip("the local cluster has one node: this machine allows no network namespaces (local-cluster.sh said why)")
    return nodes


def pretrain(root: Path, *options: str, wait: bool = True) -> str:
    """Submit the text run of `root` as jobs/pretrain.sbatch with sbatch `options`; its job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *(["--wait"] if wait else []), f"--chdir={REPO}", "--cpus-per-task=1",
         f"--comment={SESSION_TAG}", f"--output={root}/slurm-%j.out", *options, str(PRETRAIN), "configs/demo.yaml",
         "text", f"paths.root={root}", *TRAIN],
        capture_output=True, text=True, env=slurm_env(), timeout=900,
    )
    assert proc.returncode == 0, (proc.stderr, log(root))
    return proc.stdout.split()[0].split(";")[0]


def log(root: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(root.glob("slurm-*.out")))


def run_dir(root: Path) -> Path:
    return root / "runs/demo/text"


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir(root))[-1] / "model.safetensors")


def final_position(root: Path) -> dict:
    states = states_dir(run_dir(root))
    return json.loads((states / (states / LATEST).read_text().strip() / STATE_POSITION).read_text())


def metrics(root: Path) -> list[dict]:
    """metrics.jsonl: a row per step (train.log_every=1)."""
    return [json.loads(line) for line in (run_dir(root) / "metrics.jsonl").read_text().splitlines()]


def trained_batches(root: Path) -> list[tuple[int, int, str]]:
    """(step, epoch, digest of the data trained on up to that step) of every step."""
    return [(r["step"], r["epoch"], r["data"]) for r in metrics(root)]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def job_state(job: str) -> str:
    return (job_info(job) or [{}])[0].get("JobState", "")


@pytest.fixture(scope="module")
def across_two_nodes(two_nodes, fresh_root) -> Path:
    """The run trained by one job on both nodes, one rank each, without interruption."""
    root = fresh_root()
    pretrain(root, "--nodes=2")
    return root


def test_training_across_two_nodes_equals_two_ranks_on_one_node(across_two_nodes, fresh_root):
    one_node = fresh_root()
    pretrain(one_node, "--nodes=1", "--ntasks-per-node=2")
    assert "on 2 node(s): vlnode[1-2]" in log(across_two_nodes)
    assert "on 1 node(s)" in log(one_node)
    a, b = list_checkpoints(run_dir(across_two_nodes)), list_checkpoints(run_dir(one_node))
    assert [c.name for c in a] == [c.name for c in b] and len(a) > 3
    for x, y in zip(a, b):
        wx, wy = load_file(x / "model.safetensors"), load_file(y / "model.safetensors")
        assert all(torch.equal(wx[k], wy[k]) for k in wy), x.name  # gloo sums two ranks in one order


def test_a_job_that_loses_a_node_resumes_on_the_node_left_with_the_same_batches(across_two_nodes, fresh_root):
    root = fresh_root()
    # --nodes=1-2: both nodes where both are free, and the one that is left after a node is lost
    job = pretrain(root, "--nodes=1-2", wait=False)
    steps = run_dir(root) / "metrics.jsonl"
    wait_until(lambda: steps.is_file() and len(steps.read_text().splitlines()) >= 70, 300,
               "training to pass step 70")
    assert "on 2 node(s): vlnode[1-2]" in log(root)
    try:
        # the node of the batch script, of rank 0 and of the run's lock: the job goes on on the other one
        subprocess.run(["bash", str(CLUSTER), "crash", "vlnode1"], env=slurm_env(), check=True, capture_output=True)
        # slurmctld finds the node silent (SlurmdTimeout), ends the job's tasks on vlnode2 and requeues it;
        # Slurm holds a requeued job back for two minutes (BeginTime), which an operator may release.
        wait_until(lambda: job_state(job) == "PENDING", 180, "the job to be requeued after the node was lost")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env(), check=True)
        wait_until(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the requeued job to end")
        assert job_state(job) == "COMPLETED", log(root)
    finally:
        ensure_cluster()  # the lost node's slurmd starts again, and the node returns
    assert "start 2, on 1 node(s): vlnode2" in log(root), log(root)

    # The same batches in the same steps: every step once, each with the uninterrupted run's data digest,
    # and every word of every epoch seen once (10 epochs of the first epoch's words).
    assert trained_batches(root) == trained_batches(across_two_nodes)
    position, reference = final_position(root), final_position(across_two_nodes)
    assert position == reference | {"loss": position["loss"]}
    epoch_words = max(r["words"] for r in metrics(root) if r["epoch"] == 0)
    assert position["words_seen"] == 10 * epoch_words
    # The weights of the uninterrupted run, up to the order of the sums: one rank accumulates two
    # micro-batches where two ranks all-reduce one each.
    got, want = final_weights(root), final_weights(across_two_nodes)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"lost node: {position['step']} steps, {position['words_seen']} words; max |Δweight| {worst:.2e}")
    assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5) for k in want), worst


# -- many writers, one results folder ----------------------------------------------------------------

SWEEP = [*SMALL_WORLD, *FAST_TRAIN, "sweep.alphas=[0.0, 1.0]", "sweep.methods=[{name: linear}, {name: slerp}]", "sweep.tasks=[blimp]",
         "eval.batch_size=128"]


def submit(root: Path, *words: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", "--cpus-per-task=1", f"--comment={SESSION_TAG}",
                           f"--output={root}/slurm-%A_%a.out", *words], capture_output=True, text=True,
                          env=slurm_env(), timeout=60, check=True)
    return proc.stdout.split(";")[0].strip()


def raw_rows(results: Path, dataset: str) -> pd.DataFrame:
    """Every row of every file of a results dataset, duplicates kept."""
    files = result_files(results, dataset)
    return pd.concat([pq.read_table(f).to_pandas() for f in files]) if files else pd.DataFrame()


def test_a_results_folder_shared_by_both_nodes_holds_each_item_once(two_nodes, twins, tmp_path):
    """The sweep array spread over both nodes, one of its tasks submitted twice, a task killed at a
    random point and submitted again (a requeue), and compactions started while items still write."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    args = ["configs/demo.yaml", f"paths.root={root}", *SWEEP]
    cfg = load_config(args[0], args[1:])
    planned = {it.item_id for it in plan(cfg)}
    n = len(planned)
    sweep = ["jobs/sweep.sbatch", *args]
    compaction = ["jobs/vlmerge.sbatch", "results", "compact", "--config", *args]

    array = submit(root, f"--array=0-{n - 1}", *sweep)
    twice = rng.randrange(n)
    submit(root, f"--array={twice}", *sweep)  # a requeue overlapping the running task: the same items twice
    time.sleep(rng.uniform(0, 8))
    submit(root, *compaction)
    # A task killed at a random point of its run (a pending array task cannot take a signal: Slurm
    # would cancel it with the array's other pending tasks), then submitted again, as a requeue does.
    killed = rng.randrange(n)
    task = f"{array}_{killed}"
    wait_until(lambda: job_state(task) in ("RUNNING", "COMPLETED", "FAILED"), 600, f"array task {task} to start")
    time.sleep(rng.uniform(0, 6))
    subprocess.run(["scancel", "--signal=KILL", "--full", task], env=slurm_env(), check=True)
    submit(root, f"--array={killed}", *sweep)
    time.sleep(rng.uniform(0, 8))
    submit(root, *compaction)
    wait_for_session_jobs(900)
    spread = {line.split()[-1] for p in root.glob("slurm-*.out") for line in p.read_text().splitlines()
              if line.startswith("sweep: job ")}
    print(f"shared folder (seed {seed}): task {twice} twice, task {killed} killed, array tasks on {sorted(spread)}")

    results = cfg.layout.results_dir
    before = raw_rows(results, "metrics")
    assert main(["results", "compact", "--config", *args]) == 0
    after = raw_rows(results, "metrics")
    merged = after[after.method != "none"]
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(root.glob("slurm-*.out")))
    lost = planned - set(merged.item_id)
    assert not lost, (lost, sorted(set(before.item_id) & lost), logs)  # no item lost
    keys = ["item_id", *DEDUPE["metrics"]]
    assert not after.duplicated(keys).any()  # no row twice
    assert set(map(tuple, after[keys].astype(str).values)) == set(map(tuple, before[keys].astype(str).values))
    # every item has its every row: the same (α, task, subtask, metric) rows as each item of its method
    per_item = merged.groupby("item_id").apply(lambda f: frozenset(zip(f.alpha, f.subtask, f.metric)))
    methods = merged.groupby("item_id").method.first()
    assert all(len(set(per_item[methods == m])) == 1 for m in set(methods)), per_item
    items = raw_rows(results, "items")
    assert not items.duplicated(["item_id", *DEDUPE["items"]]).any()
    assert len(spread) == 2, spread  # the array ran on both nodes
