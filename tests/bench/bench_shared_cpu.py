"""One sweep item on a shared CPU: alone, then beside busy processes on the same cores.

    .venv/bin/python tests/bench/bench_shared_cpu.py [--root DIR] [--competitors 2] [--repeats 3]

A sweep array task packed on a node without CPU binding, or a run on a busy login node, shares its
cores with other processes. The item (`vlmerge sweep run --item ID`, exactly as an array task runs
it, threads from its allotment and idle threads asleep: `vlmerge.launch.use_allotted_cpus`) is run
alone and then beside --competitors busy loops pinned to the same CPUs. Printed per case: wall
time, the CPU time the item got, and:

- slowdown: contended wall / alone wall;
- fair-share slowdown, measured: the share of CPU time per second the item got alone / beside the
  competitors (what it would lose if every CPU second it got did useful work); the goal is
  slowdown <= 1.5x this;
- fair-share slowdown, nominal: (threads + competitors) / threads, the kernel's even split.

The item is the first linear item of the plan of a small demo world trained here, in a temp root or
in --root (kept there and reused: every stage skips finished work). The runs are interleaved; each
figure is the median of --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlmerge.config import load_config
from vlmerge.launch import allotted_cpus
from vlmerge.sweep.commands import current_plan

# A world and runs small enough to train in a minute, an item long enough to time (tens of seconds).
SMALL = ["demo.text_words=20000", "demo.n_images=2000", "demo.n_winoground=100", "demo.pairs_per_phenomenon=60",
         "checkpoints.words=[20000]", "sweep.methods=[{name: linear}]"]
BUSY = "while True: pass"


def vlmerge(*args: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `python -m vlmerge ARGS`; (wall seconds, CPU seconds of the process and its threads)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vlmerge", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_shared_cpu: vlmerge {' '.join(args)} failed:\n{proc.stderr.read()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def fresh_results(root: Path, k: int) -> Path:
    """An output root sharing `root`'s inputs and runs, with no results: the item runs again."""
    out = Path(tempfile.mkdtemp(prefix=f"shared-cpu-{k}-"))
    for name in os.listdir(root):
        if name not in ("results", "reports", "logs"):
            os.symlink(root / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="where to keep the small world and its twins (default: a temp root)")
    ap.add_argument("--competitors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    overrides = SMALL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp).resolve()
        cfg = load_config(None, [f"paths.root={root}", *overrides])
        for stage in ("demo-data", "tokenizer", "corpus", "precompute"):
            vlmerge(stage, "--quiet", f"paths.root={root}", *overrides)
        for run in ("text", "multimodal"):
            vlmerge("train", "--quiet", "--run", run, f"paths.root={root}", *overrides)
        item = next(it for it in current_plan(cfg) if it.method == "linear")
        threads = allotted_cpus()
        cases = {"alone": 0, f"beside {args.competitors} busy": args.competitors}
        times: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
        for k in range(args.repeats):
            for case, competitors in cases.items():
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
                try:
                    out = fresh_results(root, k)
                    times[case].append(vlmerge("sweep", "run", "--quiet", "--item", item.item_id,
                                               f"paths.root={out}", *overrides))
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
    (wall0, cpu0), (wall1, cpu1) = ([statistics.median(x) for x in zip(*times[c])] for c in cases)
    slowdown, fair = wall1 / wall0, (cpu0 / wall0) / (cpu1 / wall1)
    nominal = (threads + args.competitors) / threads
    print(f"shared CPU: one sweep item ({item.item_id}, {len(cfg.sweep.alphas)} α, tasks "
          f"{', '.join(cfg.sweep.tasks or cfg.eval.tasks)}), {threads} threads on {threads} CPUs, "
          f"median of {args.repeats}")
    print(f"  alone               : {wall0:7.1f} s wall, {cpu0:7.1f} s CPU")
    print(f"  beside {args.competitors} busy loops : {wall1:7.1f} s wall, {cpu1:7.1f} s CPU")
    print(f"  slowdown {slowdown:.2f}x; fair share {fair:.2f}x measured (CPU it got), {nominal:.2f}x nominal; "
          f"slowdown / fair share = {slowdown / fair:.2f} (goal <= 1.5), {slowdown / nominal:.2f} nominal")


if __name__ == "__main__":
    main()
