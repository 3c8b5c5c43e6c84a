"""`make gpu-check`: every stage that runs a model, on this machine's GPU(s), checked against the CPU.

    .venv/bin/python tests/bench/gpu_check.py [--root DIR] [--pairs 30] [--cpu-dry-run]

Without a CUDA GPU it says so in one line and exits 0. With one (sized for at most 8 minutes on one
GPU; not yet run on one):

1. precompute: the demo world's images through its DINOv2 in fp16 on the GPU (images/s), and
   against the same features in fp32 on the CPU;
2. train: each twin for one epoch (a few hundred steps) at the papers' width (6 layers × 768) in
   fp16 and in bf16 with DeepSpeed (NCCL, data-parallel over 2 GPUs when there are two, a global
   batch of 32); tokens/s;
3. one sweep item: linear at 11 α of the fp16 twins, merged in place on the GPU, scored on BLiMP
   (--pairs of each of the 67 real paradigms of ../shared/data/blimp), the demo VQA and Winoground,
   in fp32 (TF32 off) and bf16 on the GPU and in fp32 on the CPU: every GPU decision (each item's
   best candidate) against the CPU fp32 decision, over the items that are not ties (a CPU margin
   within the scores' rounding: 1e-3 nats for fp32, 0.05 for bf16; all items are counted too);
   pairs/s; and `vlmerge sweep run` of that item end to end on the GPU;
4. the scorer's share of the GPU's bf16 matmul peak at the model's shapes: the model arithmetic it
   runs per second (bench_scoring_profile's measure: 2 FLOPs per decoder weight per token run, and
   per LM-head weight per logit row read) over the best `F.linear` rate at the model's weight
   shapes with a batch's token rows.

Goals (issue 23): decisions equal on >= 99.9% of non-tie items; >= 40% of the bf16 peak. The exit
status is 1 when a decision check fails. --cpu-dry-run runs the same steps on the CPU, small (fp32
and bf16, no fp16), to check this script where there is no GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
SHARED_BLIMP = REPO.parent / "shared" / "data" / "blimp"
WIDE = ["model.num_layers=6", "model.hidden_size=768", "model.num_heads=12", "model.intermediate_size=3072",
        "tokenizer.vocab_size=4096"]
TRAIN = ["train.micro_batch_size=16", "train.global_batch=32", "train.epochs=1", "runs.multimodal.epochs=1",
         "checkpoints.words=[20000]", "train.lr=3e-4", "train.log_every=20"]
SMALL = ["demo.text_words=8000", "demo.n_images=400", "demo.n_winoground=40", "demo.pairs_per_phenomenon=20",
         "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.intermediate_size=128",
         "train.micro_batch_size=16", "train.global_batch=32", "train.epochs=1", "runs.multimodal.epochs=1",
         "checkpoints.words=[2000]", "train.log_every=20"]
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
# A tie: a CPU fp32 margin (best candidate over the second, nats) within the scores' rounding, where
# a decision may flip by rounding alone: fp32 sums in another order move a sentence's log-probability
# by ~1e-5; bf16 keeps 8 bits of mantissa per logit, a few hundredths over a sentence.
TIE = {"fp32": 1e-3, "bf16": 0.05}


def vlmerge(*args: str, gpus: int = 1, env: dict | None = None) -> float:
    """Run a vlmerge stage (over `gpus` ranks with torchrun); its wall seconds. A failure ends the check."""
    launcher = [sys.executable, "-m", "vlmerge"]
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                    "-m", "vlmerge", "--"]
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode != 0:
        sys.exit(f"gpu-check: vlmerge {' '.join(args[:3])} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def blimp_subset(folder: Path, per_paradigm: int) -> Path:
    """The first `per_paradigm` pairs of every real BLiMP paradigm, as a task folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(SHARED_BLIMP.glob("*.jsonl")):
        (folder / f.name).write_text("\n".join(f.read_text().splitlines()[:per_paradigm]) + "\n")
    return folder


def decisions(logprob: np.ndarray, requests) -> tuple[np.ndarray, np.ndarray]:
    """Per group of candidates: the index of the best one, and its margin over the second."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group, []).append(i)
    best, margin = [], []
    for members in groups.values():
        scores = np.sort(logprob[members])
        best.append(int(np.argmax(logprob[members])))
        margin.append(scores[-1] - scores[-2] if len(scores) > 1 else np.inf)
    return np.array(best), np.array(margin)


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int]], rows: int, device: torch.device) -> float:
    """Best F.linear FLOP/s over the weight shapes with `rows` token rows."""
    best = 0.0
    for d_in, d_out in shapes:
        x = torch.randn(rows, d_in, dtype=dtype, device=device)
        w = torch.randn(d_out, d_in, dtype=dtype, device=device)
        for _ in range(3):
            F.linear(x, w)
        sync(device)
        t0, repeats = time.perf_counter(), 20
        for _ in range(repeats):
            F.linear(x, w)
        sync(device)
        best = max(best, 2 * rows * d_in * d_out * repeats / (time.perf_counter() - t0))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="the check's output root (default: a temp folder)")
    ap.add_argument("--pairs", type=int, default=30, help="BLiMP pairs per paradigm")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU, small (checks this script)")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (a CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES empty); "
              "nothing checked")
        return 0
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    gpus = 1 if dry else min(torch.cuda.device_count(), 2)
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    print(f"gpu-check on {gpus} × {name}, torch {torch.__version__}", flush=True)
    shape = SMALL if dry else WIDE + TRAIN
    precisions = ["fp32", "bf16"] if dry else ["fp16", "bf16"]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp).resolve()
        base = [f"paths.root={root}", *shape, f"features.device={device.type}"]

        # 1. the world, and its images through the encoder in fp16 on the GPU (fp32 on the CPU to compare)
        vlmerge("demo-data", "--quiet", *base)
        stores = {}
        for precision, where in (("fp16" if not dry else "bf16", device.type), ("fp32", "cpu")):
            store = f"check-{precision}-{where}"
            seconds = vlmerge("precompute", "--quiet", *base, f"features.name={store}", f"features.precision={precision}",
                              f"features.device={where}", "features.dtype=float32", "features.batch_size=256",
                              f"features.num_workers={min(8, os.cpu_count() or 1)}")
            import h5py

            with h5py.File(root / "features" / f"{store}.h5") as f:
                stores[where] = f["features"][:]
            if where == device.type:
                print(f"precompute: {len(stores[where])} images in {precision} on {where}: "
                      f"{len(stores[where]) / seconds:.0f} images/s (whole process)", flush=True)
        gap = np.abs(stores[device.type] - stores["cpu"]).max()
        print(f"  largest difference from the fp32 CPU features: {gap:.4f}", flush=True)
        store = f"features.name=check-{'fp16' if not dry else 'bf16'}-{device.type}"

        # 2. the twins, in each precision, DeepSpeed over `gpus` ranks
        for precision in precisions:
            exp = [*base, store, f"experiment=check-{precision}", f"train.precision={precision}"]
            vlmerge("tokenizer", "--quiet", *exp)
            vlmerge("corpus", "--quiet", *exp)
            for run in ("text", "multimodal"):
                vlmerge("train", "--quiet", "--run", run, *exp, gpus=gpus)
                rows = [json.loads(line) for line in
                        (root / "runs" / f"check-{precision}" / run / "metrics.jsonl").read_text().splitlines()]
                print(f"train {run} {precision} on {gpus} rank(s): {rows[-1]['step']} steps, "
                      f"{rows[-1]['tokens_per_s']:.0f} tokens/s, loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}",
                      flush=True)

        # 3. one sweep item of the first precision's twins: linear, 11 α
        blimp = blimp_subset(root / "blimp", args.pairs)
        exp = [*base, store, f"experiment=check-{precisions[0]}", f"sweep.alphas={ALPHAS}",
               "sweep.methods=[{name: linear}]", "sweep.tasks=[blimp, vqa, winoground]", "sweep.distances=false",
               f"eval.tasks={{blimp: {blimp}, vqa: '{{root}}/demo/eval/vqa.jsonl', "
               f"winoground: '{{root}}/demo/eval/winoground.jsonl'}}"]
        failed |= compare_decisions(exp, device)
        out = root / "sweep-run"
        out.mkdir()
        for entry in root.iterdir():
            if entry.name not in ("results", "sweep-run"):
                os.symlink(entry, out / entry.name)
        exp_out = [a.replace(f"paths.root={root}", f"paths.root={out}") for a in exp]
        from vlmerge.config import load_config
        from vlmerge.sweep.commands import current_plan

        item = current_plan(load_config(None, exp_out))[-1]
        seconds = vlmerge("sweep", "run", "--quiet", "--item", item.item_id, *exp_out, f"compute.device={device.type}")
        print(f"sweep run of one item end to end on {device.type} (11 α, endpoints, process start included): "
              f"{seconds:.1f} s", flush=True)
        shutil.rmtree(out)
    print("gpu-check: " + ("FAILED (decisions)" if failed else "every check passed"))
    return int(failed)


def compare_decisions(exp: list[str], device: torch.device) -> bool:
    """Score the item's 11 merges on the device (fp32, bf16) and on the CPU (fp32); True when a
    decision check fails. Prints pairs/s and the share of the bf16 matmul peak."""
    from vlmerge.config import load_config
    from vlmerge.data import FeatureTable
    from vlmerge.evaluate.run import config_scorer, load_model, prepare, task_specs
    from vlmerge.merge.core import Pair, PairMerger
    from vlmerge.problems import ProblemLog
    from vlmerge.sweep.commands import current_plan

    cfg = load_config(None, exp)
    item = current_plan(cfg)[-1]
    features = FeatureTable(cfg.eval_store_path)
    tasks = prepare(task_specs(cfg, ["blimp", "vqa", "winoground"]), features, ProblemLog())
    pair = Pair.open(cfg.root / item.text, cfg.root / item.mm)
    runs = {"cpu fp32": (torch.device("cpu"), "fp32"), f"{device.type} fp32": (device, "fp32"),
            f"{device.type} bf16": (device, "bf16")}  # (a dry run on the CPU has two: fp32 is the reference)
    scores: dict[str, dict[str, list[np.ndarray]]] = {}
    timing = {}
    for label, (where, dtype) in runs.items():
        if where.type == "cuda":
            from vlmerge.device import resolve_device

            resolve_device(str(where))  # TF32 off
        merger = PairMerger(pair, device=where)
        model, tokenizer = load_model(cfg.root / item.text, where)
        scorer = config_scorer(cfg, model, tokenizer, features, dtype=dtype)
        prepared = {t.task.name: scorer.prepared(t.requests) for t in tasks}
        scorer.score(prepared["blimp"])  # warm-up
        scores[label], blimp_seconds = {t: [] for t in prepared}, 0.0
        for alpha in ALPHAS:
            merger.merge_into(model, "linear", alpha)
            for t, p in prepared.items():
                sync(where)
                t0 = time.perf_counter()
                scores[label][t].append(scorer.score(p).logprob)
                sync(where)
                blimp_seconds += (time.perf_counter() - t0) if t == "blimp" else 0.0
        pairs = len(tasks[0].items) * len(ALPHAS)
        timing[label] = (pairs / blimp_seconds, prepared["blimp"], model)
        print(f"score {label}: BLiMP {pairs / blimp_seconds:.0f} pairs/s ({len(tasks[0].items)} pairs × 11 α)",
              flush=True)

    failed = False
    for label, (_, dtype) in runs.items():
        if label == "cpu fp32":
            continue
        for t in tasks:
            agree, total, exact = 0, 0, 0
            for ref, got in zip(scores["cpu fp32"][t.task.name], scores[label][t.task.name]):
                (want, margin), (have, _) = decisions(ref, t.requests), decisions(got, t.requests)
                keep = margin >= TIE[dtype]
                agree += int((want == have)[keep].sum())
                total += int(keep.sum())
                exact += int((want == have).sum())
            share = agree / max(total, 1)
            ok = share >= 0.999
            failed |= not ok
            every = len(scores["cpu fp32"][t.task.name]) * len(decisions(scores["cpu fp32"][t.task.name][0], t.requests)[0])
            print(f"  {label} vs cpu fp32, {t.task.name}: decisions equal on {share:.4%} of {total} non-tie "
                  f"(item, α) ({exact / every:.4%} of all {every}) {'ok' if ok else 'BELOW 99.9%'}", flush=True)

    # the bf16 scorer's share of the bf16 matmul peak at the model's shapes
    rate, prepared, model = timing[f"{device.type} bf16"]
    text = model.config.text_config
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    head = model.lm_head.weight.numel()
    run_tokens = sum(int((b.segments >= 0).sum()) for b in prepared.batches)
    rows = sum(int(b.keep.sum()) for b in prepared.batches)
    per_pair = (2 * layers * run_tokens + 2 * head * rows) / len(tasks[0].items)
    achieved = rate * per_pair
    batch_rows = max(b.ids.numel() for b in prepared.batches)
    shapes = [(text.hidden_size, text.hidden_size), (text.hidden_size, text.intermediate_size),
              (text.intermediate_size, text.hidden_size), (text.hidden_size, text.vocab_size)]
    peak = matmul_peak(torch.bfloat16, shapes, batch_rows, device)
    print(f"  bf16 scoring: {achieved / 1e12:.2f} TFLOP/s of model arithmetic; F.linear peak at the model's shapes "
          f"({batch_rows} rows) {peak / 1e12:.2f} TFLOP/s: {achieved / peak:.0%} of it (goal >= 40%)", flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
