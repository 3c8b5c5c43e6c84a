"""`vlmerge sweep plan --estimate` against the sweep it predicts: the demo's, measured.

    .venv/bin/python tests/bench/bench_estimate.py [--root DIR] [--repeats 3] [--config configs/demo.yaml]

The demo world is built and its twins trained (in a temp root, or in --root, kept there and reused:
every stage skips finished work). Then, --repeats times, on an output root that shares the runs
and has no results: the estimate (`sweep plan --estimate --json`, its calibration included: one
pair loaded, one α merged per method, a sample of each task scored) predicts the wall time of the
whole sweep in one process, and `vlmerge sweep run` (the whole sweep, one process, as `make demo`
runs it) is timed from its start to its exit. Printed: both, per run and as medians, and their ratio
(the goal: within ±30%), with the predicted and the measured peak memory of the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_shared_cpu import fresh_results, vlmerge

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="where to keep the demo world and its twins (default: a temp root)")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp).resolve()
        config = ["--config", args.config, f"paths.root={root}"]
        for stage in ("demo-data", "tokenizer", "corpus", "precompute"):
            vlmerge(stage, "--quiet", *config)
        for run in ("text", "multimodal"):
            vlmerge("train", "--quiet", "--run", run, *config)
        runs = []
        for k in range(args.repeats):
            out = fresh_results(root, k)
            here = ["--config", args.config, f"paths.root={out}"]
            t0 = time.perf_counter()
            estimate = subprocess.run([sys.executable, "-m", "vlmerge", "sweep", "plan", "--estimate", "--json", *here],
                                      capture_output=True, text=True, check=True)
            calibration = time.perf_counter() - t0
            predicted = json.loads(estimate.stdout)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "vlmerge", "sweep", "run", "--quiet", *here],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            measured = time.perf_counter() - t0
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"bench_estimate: the sweep failed:\n{proc.stderr.read()[-2000:]}")
            seconds = predicted["estimate"]["one_process_seconds"]
            runs.append((seconds, measured, predicted["estimate"]["peak_rss"], usage.ru_maxrss * 1024, calibration))
            print(f"  run {k + 1}: predicted {seconds:.1f} s, measured {measured:.1f} s, ratio {seconds / measured:.2f}; "
                  f"the estimate itself took {calibration:.1f} s", flush=True)
    p, m, rss_p, rss_m, cal = (statistics.median(x) for x in zip(*runs))
    items = predicted["estimate"]["items"]
    print(f"sweep estimate vs the measured sweep: {items} items, {predicted['estimate']['merged_models']} merged models "
          f"({Path(args.config).name}), median of {args.repeats}")
    print(f"  wall time: predicted {p:.1f} s, measured {m:.1f} s: ratio {p / m:.2f} (goal 0.70 … 1.30)")
    print(f"  peak RSS of the worker: predicted {rss_p / 2**30:.2f} GiB, measured {rss_m / 2**30:.2f} GiB; "
          f"calibration {cal:.1f} s")


if __name__ == "__main__":
    main()
