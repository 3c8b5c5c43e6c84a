"""The sweep through submitit's `map_array`, on this machine or on Slurm:

    python slurm/sweep.py --config configs/demo.yaml --executor local
    python slurm/sweep.py --config configs/babylm-takmaz2025.yaml --executor slurm --profile gpu [KEY=VALUE ...]

Only items not done yet are submitted; past the cluster's MaxArraySize several items are packed
per array task. The submitit folder is results/<exp>/submitit/. Cluster settings (partition,
account, GPUs, time) come from slurm/profiles/<profile>.yaml. The work is `vlmerge.launch.submit_sweep`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from vlmerge.config import load_config
from vlmerge.errors import VlmergeError
from vlmerge.launch import submit_sweep

PROFILES = Path(__file__).resolve().parent / "profiles"


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
        jobs = submit_sweep(args.config, args.overrides, args.executor, profile, cfg.layout.results_dir / "submitit")
        if not args.no_wait:
            ran = sum(job.result() for job in jobs)
            print(f"sweep: {ran} item(s) run")
    except VlmergeError as e:
        print(f"slurm/sweep.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
