"""The adaptive search against the full grid, on the demo world: #27's three figures.

    .venv/bin/python tests/bench/bench_adaptive.py [--root outputs] [--alphas 11] [--probe-lines 32]

The demo's trained twins (`make demo`'s; --root is its `paths.root`, and without them there the demo
pipeline runs there first) are swept twice, in fresh
copies of the root, with the demo's three merge settings over an --alphas grid and the probe on:
the full grid (every α evaluated: the peer) and `sweep.search: adaptive`. Printed:

1. per task, Spearman's ρ between the probe's predicted drops (the predictor fitted on the twins)
   and the measured drops across (pair, α), from the full grid (`vlmerge.analysis.probe`);
   goal ≥ 0.8;
2. the share of (checkpoint pair, setting) on which the adaptive search's best α (the analysis's
   rule over the α it evaluated) is within one grid step of the full grid's best α (both finding
   no α within analysis.tolerance counts as agreeing), goal ≥ 90%, and its evaluations as a share
   of the grid's (merged models evaluated in full), goal ≤ 40%;
3. the probe's cost in the adaptive run (its seconds over every α) against the full grid's
   evaluation seconds (both from the items' timing lines), goal ≤ 5%.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from vlmerge.analysis.load import MODEL, load
from vlmerge.analysis.probe import probe_tables, rank_agreement
from vlmerge.analysis.tables import twin_keys
from vlmerge.config import load_config
from vlmerge.predict import PROBE, Predictor, best_alpha, targets
from vlmerge.results import UNMERGED

REPO = Path(__file__).resolve().parents[2]
WORLD = ("demo", "features", "runs")


def sweep(root: Path, search: str, alphas: list[float], probe_lines: int) -> tuple[float, str]:
    """(wall seconds, stdout) of one `vlmerge sweep run` on a fresh copy of the world."""
    overrides = [f"paths.root={root}", f"sweep.alphas={alphas}", f"sweep.search={search}", "sweep.probe=true",
                 f"sweep.probe_lines={probe_lines}", "sweep.finetune=[]"]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlmerge", "sweep", "run", "--quiet", *overrides],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"sweep ({search}) failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t, done.stdout


def seconds(log: str, phase: str) -> float:
    """The seconds of one phase over every item: its per-α time × its α (Timing.line)."""
    return sum(float(s) * int(n) for s, n in re.findall(rf"{phase} ([\d.]+)s \((\d+) α\)", log))


def measured_best(root: Path, cfg) -> tuple[dict[tuple, float | None], int]:
    """(per (pair, setting) the analysis's best α over the α evaluated in full, the merges evaluated)."""
    metrics = load([root / "results/demo"]).metrics
    rows = {k: p.to_dict("records") for k, p in metrics.groupby(MODEL)}
    predictor = Predictor.fitted(*targets(cfg), [r for k, r in rows.items() if k[1] == UNMERGED])
    merged = [k for k, r in rows.items() if k[1] != UNMERGED and any(x["task"] != PROBE for x in r)]
    keys = pd.DataFrame(merged, columns=MODEL)
    text, mm = twin_keys(keys, "text"), twin_keys(keys, "mm")
    outcomes: dict[tuple, dict] = {}
    for i, k in enumerate(merged):
        outcomes.setdefault(k[:-1], {})[k[-1]] = predictor.measured(rows[k], (rows[tuple(text[i])], rows[tuple(mm[i])]))
    return {k: best_alpha(o, cfg.analysis.tolerance) for k, o in outcomes.items()}, len(merged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO / "outputs", help="the demo's paths.root (make demo)")
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--probe-lines", type=int, default=32)
    args = ap.parse_args()
    if not (args.root / "runs/demo/text").is_dir():  # the demo world first, as `make demo` builds it
        print(f"{args.root}: no trained demo twins: running the demo pipeline there first", flush=True)
        subprocess.run([sys.executable, "-m", "vlmerge", "pipeline", "--config", "configs/demo.yaml",
                        f"paths.root={args.root.resolve()}"], cwd=REPO, check=True)
    alphas = [round(i / (args.alphas - 1), 4) for i in range(args.alphas)]
    with tempfile.TemporaryDirectory(prefix="vlmerge-bench-adaptive-") as tmp:
        roots = {}
        for search in ("grid", "adaptive"):
            roots[search] = Path(tmp) / search
            for part in WORLD:
                shutil.copytree(args.root / part, roots[search] / part, symlinks=True)
        wall, logs = {}, {}
        for search, root in roots.items():
            wall[search], logs[search] = sweep(root, search, alphas, args.probe_lines)
        cfg = load_config(None, [f"paths.root={roots['grid']}"])
        drops, _ = probe_tables(load([roots["grid"] / "results/demo"]).metrics, cfg.analysis)
        grid, evaluated_grid = measured_best(roots["grid"], cfg)
        adaptive, evaluated = measured_best(roots["adaptive"], cfg)

    print(f"demo world, {len(grid)} (pair, setting) × {args.alphas} α, probe on {args.probe_lines} lines and captions")
    print("1. predicted against measured drops, across (pair, α):")
    for task, rho, n in rank_agreement(drops).itertuples(index=False):
        print(f"   {task:<26} Spearman ρ = {rho:.3f} ({n} merges)")
    steps = {}
    for key, best in grid.items():
        got = adaptive.get(key)
        steps[key] = 0 if best is None and got is None else (
            None if best is None or got is None else abs(alphas.index(best) - alphas.index(got)))
    near = sum(s is not None and s <= 1 for s in steps.values())
    print(f"2. adaptive best α within one grid step of the full grid's: {near}/{len(steps)} = {near / len(steps):.1%} "
          f"(goal ≥ 90%); evaluations {evaluated}/{evaluated_grid} = {evaluated / evaluated_grid:.1%} (goal ≤ 40%)")
    for key, s in steps.items():
        if s is None or s > 1:
            print(f"   missed: {key[1]} {key[2]} at {key[-1]:,} words: grid {grid[key]}, adaptive {adaptive.get(key)}")
    probe, evaluation = seconds(logs["adaptive"], "probe"), seconds(logs["grid"], "evaluate")
    print(f"3. probe {probe:.1f}s (adaptive run) / full grid's evaluation {evaluation:.1f}s = {probe / evaluation:.1%} "
          f"(goal ≤ 5%)")
    print(f"wall: grid {wall['grid']:.0f}s, adaptive {wall['adaptive']:.0f}s ({wall['adaptive'] / wall['grid']:.2f}×)")


if __name__ == "__main__":
    main()
