"""Everything the suite knows about Slurm, submitit and the CPUs a process is given, in one place.

Stages never read `SLURM_*` themselves: the command line and the launchers ask this module
(array index, job id, ranks under `srun`, MaxArraySize) and pass plain values down. The
submitit sweep (`slurm/sweep.py`) is a thin shell around `submit_sweep`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default
PORT_BASE = 29500
SWEEP_JOB_NAME = "vlmerge-sweep"  # jobs/sweep.sbatch's --job-name
# sacct's states of an array task that ended without finishing its work
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise VlmergeError(f"environment variable {name}={value!r}: expected a whole number") from None


def array_task_index(env: Mapping[str, str] = os.environ) -> int | None:
    """This array task's index (SLURM_ARRAY_TASK_ID), or None outside an array job."""
    return _env_int(env, "SLURM_ARRAY_TASK_ID")


def array_shard(num_shards: int, env: Mapping[str, str] = os.environ) -> int | None:
    """The shard of this array task, checked against the number of shards the config expects."""
    index, count = array_task_index(env), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if index is not None and count is not None and count != num_shards:
        raise VlmergeError(f"SLURM array has {count} tasks but features.num_shards is {num_shards}")
    return index


def job_id(env: Mapping[str, str] = os.environ) -> str:
    """The Slurm job id, '' outside Slurm (recorded with every result row)."""
    return env.get("SLURM_JOB_ID", "")


def job_start(env: Mapping[str, str] = os.environ) -> int:
    """Which start of its Slurm job this is: 0, then 1, 2, … after each requeue (SLURM_RESTART_COUNT)."""
    return _env_int(env, "SLURM_RESTART_COUNT") or 0


def slurm_job(env: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """(job id, start) of this process's Slurm job, ("", 0) outside Slurm: what a run's lock records."""
    return job_id(env), job_start(env)


def _ask(command: list[str]) -> str | None:
    """What a Slurm client prints, or None where there is no Slurm to ask (not installed, no
    controller, no accounting: the client exits non-zero)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def max_array_size() -> int:
    """The cluster's MaxArraySize (`scontrol show config`), or Slurm's default without a cluster."""
    out = _ask(["scontrol", "show", "config"])
    for line in (out or "").splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=", 1)[1])
    return DEFAULT_MAX_ARRAY_SIZE


def queued_array_tasks(job_name: str, logs_dir: Path) -> dict[int, str] | None:
    """{task index: state} of the queued or running array tasks of the jobs named `job_name` that log
    into `logs_dir` (which tells one experiment's jobs from another's), from `squeue`; a task in
    several jobs (resubmitted) shows the one that runs. None without Slurm."""
    out = _ask(["squeue", "--noheader", "--array", f"--name={job_name}", "--Format=ArrayTaskID:0|,State:0|,StdOut:0"])
    if out is None:
        return None
    tasks: dict[int, str] = {}
    for line in out.splitlines():
        task, state, stdout = (line.split("|", 2) + [""] * 3)[:3]
        if not task.isdigit() or Path(os.path.realpath(Path(stdout).parent)) != Path(os.path.realpath(logs_dir)):
            continue
        if int(task) not in tasks or state == "RUNNING":
            tasks[int(task)] = state
    return tasks


def failed_array_tasks(array_jobs: list[int]) -> dict[tuple[int, int], str] | None:
    """{(array job, task): state} of these array jobs' tasks that ended without finishing (FAILED,
    TIMEOUT, OUT_OF_MEMORY, …), from `sacct`, which keeps the ended jobs squeue drops; None where
    the cluster keeps no accounting."""
    if not array_jobs:
        return {}
    out = _ask(["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State",
                f"--jobs={','.join(map(str, array_jobs))}"])
    if out is None:
        return None
    failed = {}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        job, _, task = job_id.partition("_")
        state = state.split()[0] if state else ""  # "CANCELLED by 0": CANCELLED
        if job.isdigit() and task.isdigit() and state in FAILED_STATES:  # (not a pending range: 12_[4-9])
            failed[int(job), int(task)] = state
    return failed


def slurm_seconds(text: str) -> float | None:
    """Seconds of a Slurm duration: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; None for UNLIMITED."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, dash, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if dash:  # after the days the fields start at hours
        h, m, s = (parts + [0.0, 0.0])[:3]
    else:  # without days: minutes, minutes:seconds, or hours:minutes:seconds
        h, m, s = [0.0, parts[0], 0.0] if len(parts) == 1 else [0.0, *parts] if len(parts) == 2 else parts
    return ((float(days or 0) * 24 + h) * 60 + m) * 60 + s


def partition_time_limit(partition: str | None = None) -> tuple[str, float | None] | None:
    """(partition, its MaxTime in seconds or None) of `partition`, or of the cluster's default
    partition, from `scontrol show partition`; None where Slurm does not answer."""
    out = _ask(["scontrol", "show", "partition", "--oneliner"])
    if out is None:
        return None
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        name = fields.get("PartitionName")
        if name and (name == partition or (partition is None and fields.get("Default") == "YES")):
            return name, slurm_seconds(fields.get("MaxTime", "UNLIMITED"))
    return None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`scontrol show hostnames` expands `node[01-04]`)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for this process.

    torchrun sets them itself; under `srun` they come from SLURM_*; a plain process is rank 0
    of 1 on a free local port.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", env["RANK"])
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", str(PORT_BASE))
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _env_int(env, "SLURM_JOB_ID") or 0
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            # The same port on every task of the job, different across jobs sharing a node.
            "MASTER_PORT": env.get("MASTER_PORT", str(PORT_BASE + job % 10_000)),
        }
    from vlmerge.train.distributed import single_process_env  # (vlmerge.train loads torch: not at import)

    return single_process_env()


def export_rendezvous() -> None:
    """Set this process's torch.distributed variables (from torchrun, srun, or a single process)."""
    os.environ.update(rendezvous_env(os.environ))


# CPU threads: from the allotment, idle threads asleep
def allotted_cpus(env: Mapping[str, str] = os.environ) -> int:
    """The CPUs this process may use: its affinity mask, or fewer where Slurm allots fewer
    (SLURM_CPUS_PER_TASK: a job without CPU binding sees every CPU of the node in its mask)."""
    cpus = len(os.sched_getaffinity(0))
    per_task = _env_int(env, "SLURM_CPUS_PER_TASK")
    return min(cpus, per_task) if per_task else cpus


def use_allotted_cpus(threads: int = 0, env: MutableMapping[str, str] = os.environ) -> int:
    """Size the intra-op thread pool to the allotment (or to `threads`, compute.threads) and let
    idle threads sleep; returns the thread count.

    OpenMP threads that spin while waiting for cores they do not get make a process on a busy,
    shared node far slower than its fair share (tests/bench/bench_shared_cpu.py, beside two busy
    loops on 2 CPUs: 2.7x slower with libgomp's default spin, 1.4-1.6x sleeping at once, where the
    fair share is 2x; alone, sleeping costs ~10% on the demo's tiny model). A short spin
    (GOMP_SPINCOUNT) measured no steadier. OpenMP reads OMP_WAIT_POLICY once, when torch loads
    it: call this before importing torch. What the environment already says (OMP_NUM_THREADS from
    torchrun, OMP_WAIT_POLICY from the user) is kept unless `threads` is given.
    """
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.setdefault("OMP_NUM_THREADS", str(allotted_cpus(env)))
    n = _env_int(env, "OMP_NUM_THREADS") or 1
    if "torch" in sys.modules:  # already loaded (a library caller): the pool can still be resized
        sys.modules["torch"].set_num_threads(n)
    return n


def sweep_gpus_per_task(device: str) -> int:
    """GPUs each sweep array task asks for: one when compute.device names CUDA (a worker per GPU;
    Slurm then shows the task only its own through CUDA_VISIBLE_DEVICES), none for auto or cpu."""
    return 1 if device.startswith("cuda") else 0


# Sweep workers: one per visible GPU (or compute.workers), each with its share of the items
def visible_gpus(count: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """The CUDA_VISIBLE_DEVICES ids of the `count` GPUs this process sees (indices or UUIDs; CUDA
    stops at the first invalid entry, so only the first `count` count)."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def worker_envs(workers: int | str, device: str, gpus: int, env: Mapping[str, str] = os.environ) -> list[dict[str, str]]:
    """The environment of each sweep worker. `workers` auto: one per visible GPU when `device` may
    use any of them (auto, cuda), each seeing only its own; else one. N workers on GPUs take them in
    turn; on the CPU (or a named cuda:N, shared) they split the CPU threads."""
    ids = visible_gpus(gpus, env) if device in ("auto", "cuda") else []
    n = (len(ids) or 1) if workers == "auto" else int(workers)
    threads = str(max(1, allotted_cpus(env) // n))
    out = []
    for k in range(n):
        worker = {**env, "OMP_NUM_THREADS": threads}
        if ids:
            worker["CUDA_VISIBLE_DEVICES"] = ids[k % len(ids)]
        out.append(worker)
    return out


def run_workers(command: list[str], envs: list[dict[str, str]]) -> None:
    """Run `command` once per environment, worker k of n with `--worker k/n` appended; raise when
    any of them fails (after all have finished: a finished item is kept either way)."""
    procs = [subprocess.Popen([*command, "--worker", f"{k}/{len(envs)}"], env=env) for k, env in enumerate(envs)]
    codes = [p.wait() for p in procs]
    failed = [(k, c) for k, c in enumerate(codes) if c != 0]
    if failed:
        k, code = failed[0]
        gpu = envs[k].get("CUDA_VISIBLE_DEVICES")
        raise VlmergeError(f"sweep worker {k}/{len(envs)}{f' (GPU {gpu})' if gpu else ''} exited with {code} "
                           f"({len(failed)} of {len(envs)} failed); run the same command again to finish their items")


# The sweep as a submitit array (slurm/sweep.py)
def run_chunk(config: str | None, overrides: list[str], item_ids: list[str]) -> int:
    """One array task: run these items of the plan (on the worker)."""
    from vlmerge.config import load_config
    from vlmerge.sweep.commands import current_plan
    from vlmerge.sweep.run import run_items

    cfg = load_config(config, overrides)
    wanted = set(item_ids)
    return run_items(cfg, [it for it in current_plan(cfg) if it.item_id in wanted], job_id=job_id())


def chunks(ids: list[str], max_tasks: int) -> list[list[str]]:
    """The item ids split into at most `max_tasks` array tasks."""
    from vlmerge.sweep.plan import array_layout

    tasks, per_task = array_layout(len(ids), max_tasks)
    return [ids[k * per_task : (k + 1) * per_task] for k in range(tasks)]


def submit_sweep(config: str | None, overrides: list[str], executor_kind: str, profile: dict[str, Any],
                 folder: Path) -> list:
    """Submit the sweep's unfinished items as one submitit array (local processes or Slurm)."""
    import submitit

    from vlmerge.config import load_config
    from vlmerge.sweep.commands import current_plan
    from vlmerge.sweep.run import is_done

    cfg = load_config(config, overrides)
    todo = [it.item_id for it in current_plan(cfg) if not is_done(cfg, it)]
    if not todo:
        print("sweep: every item is done")
        return []
    groups = chunks(todo, max_array_size() if executor_kind == "slurm" else len(todo))
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=executor_kind)
    gpus = sweep_gpus_per_task(cfg.compute.device)
    executor.update_parameters(name=f"vlmerge-sweep-{cfg.experiment}", **profile,
                               **({"slurm_gpus_per_task": gpus} if gpus and executor_kind == "slurm" else {}))
    jobs = executor.map_array(run_chunk, [config] * len(groups), [overrides] * len(groups), groups)
    note = f", {len(groups[0])} items per task (MaxArraySize)" if len(groups[0]) > 1 else ""
    print(f"sweep: {len(todo)} items in {len(jobs)} array task(s){note}; job {jobs[0].job_id.split('_')[0]}")
    return jobs
