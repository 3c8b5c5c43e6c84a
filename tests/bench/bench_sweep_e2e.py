"""End to end: one checkpoint pair × 11 α × BLiMP, our sweep worker against mergekit + minicons.

    .venv/bin/python tests/bench/bench_sweep_e2e.py [--per-paradigm 30] [--alphas 11] [--dtype fp32]
                                                   [--rss-only] [--skip-rss]

The pair: two 63M Llamas (bench_blimp's `build_model`: one BPE tokenizer, 6 layers, hidden 768,
vocab 16000, untied), trained briefly on BLiMP's good sentences from two seeds ("text", "mm"):
plain Hugging Face causal LMs, which every peer reads. The pairs: the first --per-paradigm of each
of the 67 paradigms, written as BLiMP files that both sides read.

- Ours: what one sweep worker does for one work item (the calls of vlmerge.sweep.run.ItemRunner),
  in a fresh process: read the pair once (`Pair.open`, `PairMerger`), load one model, read and
  tokenise BLiMP once, then per α merge in place and score (batch 64, the official rules).
- The peer (the usual workflow): per α, `mergekit-yaml` (linear, float32) writes the merge to disk,
  then a minicons process loads it from disk and scores every sentence (batch 32, fp32, summed
  log-probabilities, `bos_token=False`: the first token is context only, the BabyLM pipeline's rule
  for a tokenizer that adds no BOS, as this one).

Both are timed from the first process launch to the last score, with start-up, loading and
writing included. Decisions: a pair is right when good ≥ bad (the pipeline's tie rule); the
share of (pair, α) on which both sides decide alike is printed.

Peak memory of one sweep worker (--skip-rss leaves it out): ours on 2 α of a 6-layer pair at
width 768 and at width 2048 (the 1B class), max RSS from wait4 and the sampled peaks of its
anonymous and file-backed parts, against one model's fp32 size (goal: RSS ≤ 2.5× that size plus
the pair's memory-mapped inputs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_blimp import PEER_PYTHON, SHARED_BLIMP, build_model, load_pairs, peer
from bench_merge import run as run_measured

# One sweep work item in a fresh process: argv[1] a job JSON, argv[2] where the decisions go.
OURS = """
import json, sys
from pathlib import Path

from vlmerge.evaluate.run import evaluate, load_model, prepare
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import get_task
from vlmerge.merge.core import Pair, PairMerger
from vlmerge.problems import ProblemLog

job = json.loads(Path(sys.argv[1]).read_text())
merger = PairMerger(Pair.open(job["text"], job["mm"]))
model, tokenizer = load_model(Path(job["text"]))
scorer = Scorer(model, tokenizer, prompt="text", dtype=job["dtype"], batch_size=64)
(blimp,) = prepare([(get_task("blimp"), Path(job["blimp"]))], None, ProblemLog())
right = {}
for alpha in job["alphas"]:
    merger.merge_into(model, "linear", alpha)
    (result,) = evaluate(scorer, [blimp], f"linear merge at {alpha}")
    right[str(alpha)] = [item.value for item in result.items]
Path(sys.argv[2]).write_text(json.dumps(right))
"""


def write_subset(blimp: Path, out: Path, per_paradigm: int) -> list[tuple[str, str]]:
    """The first `per_paradigm` lines of every paradigm, as BLiMP files; their (good, bad) pairs."""
    out.mkdir(parents=True)
    pairs = []
    for f in sorted(blimp.glob("*.jsonl")):
        lines = [x for x in f.read_text(encoding="utf-8").splitlines() if x.strip()][:per_paradigm]
        (out / f.name).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        pairs += [(r["sentence_good"], r["sentence_bad"]) for r in map(json.loads, lines)]
    return pairs


def ours(tmp: Path, text: Path, mm: Path, blimp: Path, alphas: list[float], dtype: str, name: str = "ours"
         ) -> tuple[float, int, dict[str, int], dict[str, list[float]]]:
    """(seconds, max RSS, RSS part peaks, per α the right/wrong of every pair) of one worker process."""
    job, result = tmp / f"{name}-job.json", tmp / f"{name}-result.json"
    job.write_text(json.dumps({"text": str(text), "mm": str(mm), "blimp": str(blimp), "alphas": alphas,
                               "dtype": dtype}))
    seconds, rss, peaks = run_measured([sys.executable, "-c", OURS, str(job), str(result)], name,
                                       tmp / f"{name}-run.json", sample=True)
    return seconds, rss, peaks, json.loads(result.read_text())


def peers(tmp: Path, text: Path, mm: Path, pairs: list[tuple[str, str]], alphas: list[float]
          ) -> tuple[float, dict[str, list[float]]]:
    """(seconds, per α the right/wrong of every pair): mergekit writes each α, minicons scores it from disk."""
    mergekit = PEER_PYTHON.parent / "mergekit-yaml"
    sentences = [s for pair in pairs for s in pair]
    right, t0 = {}, time.perf_counter()
    for alpha in alphas:
        config, out = tmp / "mergekit.yml", tmp / "merged"
        config.write_text(json.dumps({  # JSON is YAML
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(text), "parameters": {"weight": alpha}},
                       {"model": str(mm), "parameters": {"weight": round(1.0 - alpha, 10)}}]}))
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run([str(mergekit), str(config), str(out), "--quiet"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_sweep_e2e: mergekit failed:\n{done.stderr[-3000:]}")
        scores, _ = peer(tmp, out, sentences, threads=torch.get_num_threads(), bos=False)
        right[str(alpha)] = list((scores[0::2] >= scores[1::2]).astype(float))
    return time.perf_counter() - t0, right


def rss_pair(root: Path, hidden: int, tokenizer_from: Path) -> tuple[Path, Path, int]:
    """Two random 6-layer Llamas of width `hidden` (the bench tokenizer beside them); their parameters."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlmerge.hf import quiet_transformers

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=6,
                         num_attention_heads=hidden // 64, vocab_size=16000, max_position_embeddings=128,
                         tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    dirs = []
    for seed, name in ((1, "text"), (2, "mm")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with quiet_transformers():
            model.save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1], sum(p.numel() for p in model.parameters())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blimp", type=Path, default=SHARED_BLIMP, help="a folder of BLiMP <UID>.jsonl files")
    ap.add_argument("--per-paradigm", type=int, default=30)
    ap.add_argument("--alphas", type=int, default=11, help="an even grid over [0, 1] (default 11: 0, 0.1, …, 1)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="ours (minicons: fp32)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true")
    args = ap.parse_args()
    if not PEER_PYTHON.is_file() and not args.rss_only:
        sys.exit(f"bench_sweep_e2e: {PEER_PYTHON} missing; run `make peers`")
    alphas = [round(k / (args.alphas - 1), 4) for k in range(args.alphas)]
    _, every, _ = load_pairs(args.blimp, 1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        blimp = tmp / "blimp"
        pairs = write_subset(args.blimp, blimp, args.per_paradigm)
        text, mm = tmp / "text", tmp / "mm"
        built = build_model(text, every, every[0::2], args.train_steps, 1760, seed=0)
        build_model(mm, every, every[1::4] + every[0::4], args.train_steps, 1760, seed=1)
        if not args.rss_only:
            ours_s, _, _, ours_right = ours(tmp, text, mm, blimp, alphas, args.dtype)
            peer_s, peer_right = peers(tmp, text, mm, pairs, alphas)
            same = np.mean([np.equal(ours_right[a], peer_right[a]).mean() for a in ours_right])
            acc = {a: float(np.mean(v)) for a, v in ours_right.items()}
            print(f"sweep end to end: one pair of {built['params']:.1f}M-parameter Llamas × {len(alphas)} α × "
                  f"{len(pairs)} BLiMP pairs ({args.per_paradigm} of each of 67 paradigms), CPU")
            print(f"  ours (one worker process, {args.dtype}, batch 64)     : {ours_s:8.1f} s")
            print(f"  mergekit + minicons (per α, from disk, fp32, batch 32): {peer_s:8.1f} s")
            print(f"  ratio (peer / ours)                                  : {peer_s / ours_s:8.2f}x   (goal >= 20x)")
            print(f"  decisions equal                                      : {same:8.2%}")
            print(f"  BLiMP accuracy (ours) from α=0 to α=1: " + " ".join(f"{acc[str(a)]:.3f}" for a in alphas))
        if not args.skip_rss:
            for hidden in (768, 2048):
                root = tmp / f"rss-{hidden}"
                t, m, n = rss_pair(root, hidden, text)
                sub = tmp / f"blimp-{hidden}"
                write_subset(args.blimp, sub, 2)
                _, rss, peaks, _ = ours(tmp, t, m, sub, [0.3, 0.7], "fp32", name=f"rss{hidden}")
                size = 4 * n
                print(f"  peak RSS, one worker, 6 × {hidden} ({n / 1e6:.0f}M parameters, {gib(size)} fp32 each): "
                      f"{gib(rss)} = {rss / size:.2f}× one model (anonymous peak {gib(peaks['RssAnon'])}, "
                      f"file-backed peak {gib(peaks['RssFile'])}; goal <= 2.5× + the mapped pair)")


if __name__ == "__main__":
    main()
