"""`make rehearsal`: Takmaz et al.'s setup at the paper's shapes on this machine, stage by stage.

    .venv/bin/python tests/bench/rehearsal.py [--config configs/rehearsal-takmaz2025.yaml] [--fast 6] [--full 15]
                                              [KEY=VALUE ...]

First the evaluation data the demo world lacks: the real BLiMP of ../shared/data/blimp sampled to
its first --fast pairs per paradigm (the sweep's set, BabyLM's fast BLiMP in the paper) and its first
--full (the set that picks the best text checkpoint, the paper's full BLiMP), under {root}/blimp/.
Then each stage runs as its own process (`vlmerge <stage> --config …`), which gives each its wall
time and peak resident memory (the stage's process, by wait4). The sweep's cost is estimated
(`vlmerge sweep plan --estimate`, calibrated on the rehearsal's own checkpoint) before the
best-text scoring and the sweep run, and set beside what they took. Everything skips finished
work: a rerun measures only what is left. The figures go to stdout and {root}/rehearsal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlmerge.config import load_config
from vlmerge.io import atomic_path, write_json
from vlmerge.layout import checkpoint_words, list_checkpoints

REPO = Path(__file__).resolve().parents[2]
SHARED_BLIMP = REPO.parent / "shared" / "data" / "blimp"
VLMERGE = Path(sys.executable).with_name("vlmerge")
STAGES = [  # (name, the vlmerge arguments)
    ("demo world", ["demo-data"]),
    ("tokenizer", ["tokenizer"]),
    ("corpus", ["corpus"]),
    ("features", ["precompute"]),
    ("train text", ["train", "--run", "text"]),
    ("train multimodal", ["train", "--run", "multimodal"]),
    ("estimate", ["sweep", "plan", "--estimate", "--json"]),
    ("best text", ["sweep", "plan"]),
    ("sweep", ["sweep", "run"]),
    ("report", ["analyze"]),
]


def sample_blimp(source: Path, out: Path, pairs: int) -> int:
    """The first `pairs` lines of every paradigm of `source` into `out` (BLiMP's layout, written once,
    atomically); the pairs there."""
    files = sorted(source.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{source}: no BLiMP paradigms (*.jsonl) here; expected ../shared/data/blimp beside the repo")
    if not out.exists():
        with atomic_path(out, is_dir=True) as tmp:
            for f in files:
                with open(f, encoding="utf-8") as src:
                    (tmp / f.name).write_text("".join(line for _, line in zip(range(pairs), src)), encoding="utf-8")
    return sum(len(f.read_text(encoding="utf-8").splitlines()) for f in out.glob("*.jsonl"))


def run_stage(args: list[str]) -> tuple[float, int, str]:
    """Run `vlmerge ARGS`, its output passed through; (wall seconds, peak RSS bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(VLMERGE), *args], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # as it comes: a stage of minutes shows its progress
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    out = "".join(lines)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"rehearsal: `vlmerge {' '.join(args)}` failed (exit {proc.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, out


def training_rate(run_dir: Path) -> dict:
    """Tokens and words per second of a run's last logged step, and its checkpoints' words."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {"tokens_per_s": last.get("tokens_per_s"), "words_per_s": last.get("words_per_s"),
            "words": last.get("words"), "checkpoints": [checkpoint_words(c) for c in list_checkpoints(run_dir)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "rehearsal-takmaz2025.yaml")
    ap.add_argument("--fast", type=int, default=6, help="BLiMP pairs per paradigm of the sweep's set")
    ap.add_argument("--full", type=int, default=15, help="BLiMP pairs per paradigm of the set that picks the text checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    blimp = {"fast": sample_blimp(SHARED_BLIMP, cfg.root / "blimp" / "fast", args.fast),
             "full": sample_blimp(SHARED_BLIMP, cfg.root / "blimp" / "full", args.full)}
    common = ["--config", str(args.config), "--quiet", *args.overrides]
    stages, estimate, total = [], None, time.perf_counter()
    for name, stage in STAGES:
        print(f"== rehearsal: {name}", flush=True)
        wall, rss, out = run_stage([*stage, *common])
        stages.append({"stage": name, "seconds": round(wall, 1), "peak_rss_bytes": rss})
        if name == "estimate":
            estimate = json.loads(out[out.index("{"):])["estimate"]
    total = time.perf_counter() - total
    runs = {run: training_rate(cfg.layout.run_dir(run)) for run in ("text", "multimodal")}
    took = {s["stage"]: s["seconds"] for s in stages}
    predicted = estimate["best_text_seconds"] + estimate["one_process_seconds"]
    actual = took["best text"] + took["sweep"]
    summary = {"config": str(args.config), "blimp_pairs": blimp, "stages": stages, "total_seconds": round(total, 1),
               "runs": runs, "estimate": estimate,
               "sweep": {"predicted_seconds": round(predicted, 1), "actual_seconds": actual,
                         "actual_over_predicted": round(actual / predicted, 3) if predicted else None}}
    write_json(cfg.root / "rehearsal.json", summary)
    print(f"\nrehearsal: {cfg.experiment} on {os.cpu_count()} CPU(s), {total / 60:.1f} min in all "
          f"(BLiMP {blimp['fast']:,} pairs fast, {blimp['full']:,} picking)")
    print(f"{'stage':<18}{'wall s':>9}{'peak RSS MiB':>14}")
    for s in stages:
        print(f"{s['stage']:<18}{s['seconds']:>9.1f}{s['peak_rss_bytes'] / 2**20:>14.0f}")
    for run, r in runs.items():
        print(f"train {run}: {r['tokens_per_s']} tokens/s, {r['words_per_s']} words/s; checkpoints at {r['checkpoints']} words")
    print(f"best text + sweep: estimated {predicted:.0f} s before they ran, took {actual:.0f} s "
          f"(×{summary['sweep']['actual_over_predicted']})")
    print(f"report: {cfg.layout.report_dir / 'report.html'}; figures in {cfg.root / 'rehearsal.json'}")


if __name__ == "__main__":
    main()
