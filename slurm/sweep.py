"""The sweep through submitit's `map_array`, on this machine or on Slurm:

    python slurm/sweep.py --config configs/demo.yaml --executor local
    python slurm/sweep.py --config configs/babylm-takmaz2025.yaml --executor slurm --profile gpu [KEY=VALUE ...]

Only items not done yet are submitted; past the cluster's MaxArraySize several items are packed
per array task. The submitit folder is results/<exp>/submitit/. Cluster settings (partition,
account, GPUs, time) come from slurm/profiles/<profile>.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit
import yaml

from vlmerge.config import Config, load_config
from vlmerge.errors import VlmergeError
from vlmerge.sweep.commands import array_layout, current_plan, max_array_size
from vlmerge.sweep.run import is_done, run_items

PROFILES = Path(__file__).resolve().parent / "profiles"


def run_chunk(config: str | None, overrides: list[str], item_ids: list[str]) -> int:
    """One array task: run these items of the plan (on the worker)."""
    cfg = load_config(config, overrides)
    wanted = set(item_ids)
    return run_items(cfg, [it for it in current_plan(cfg) if it.item_id in wanted])


def chunks(ids: list[str], max_tasks: int) -> list[list[str]]:
    tasks, per_task = array_layout(len(ids), max_tasks)
    return [ids[k * per_task : (k + 1) * per_task] for k in range(tasks)]


def submit(cfg: Config, config: str | None, overrides: list[str], executor_kind: str, profile: dict) -> list:
    todo = [it.item_id for it in current_plan(cfg) if not is_done(cfg, it)]
    if not todo:
        print("sweep: every item is done")
        return []
    groups = chunks(todo, max_array_size() if executor_kind == "slurm" else len(todo))
    executor = submitit.AutoExecutor(folder=cfg.results_dir / "submitit" / "%j", cluster=executor_kind)
    executor.update_parameters(name=f"vlmerge-sweep-{cfg.experiment}", **profile)
    jobs = executor.map_array(run_chunk, [config] * len(groups), [overrides] * len(groups), groups)
    note = f", {len(groups[0])} items per task (MaxArraySize)" if len(groups[0]) > 1 else ""
    print(f"sweep: {len(todo)} items in {len(jobs)} array task(s){note}; job {jobs[0].job_id.split('_')[0]}")
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="experiment YAML (default: the embedded demo config)")
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--profile", default="local-cluster", help=f"a file of {PROFILES}")
    ap.add_argument("--no-wait", action="store_true", help="return once submitted")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        profile_path = PROFILES / f"{args.profile}.yaml"
        if not profile_path.is_file():
            known = ", ".join(p.stem for p in sorted(PROFILES.glob("*.yaml")))
            raise VlmergeError(f"--profile {args.profile}: no {profile_path} (known: {known})")
        profile = yaml.safe_load(profile_path.read_text()) or {}
        jobs = submit(cfg, args.config, args.overrides, args.executor, profile)
        if not args.no_wait:
            ran = sum(job.result() for job in jobs)
            print(f"sweep: {ran} item(s) run")
    except VlmergeError as e:
        print(f"slurm/sweep.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
