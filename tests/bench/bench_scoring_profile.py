"""Where BLiMP scoring's time goes on the 63M Llama (CPU), and its share of the matmul peak.

    .venv/bin/python tests/bench/bench_scoring_profile.py [--pairs 15] [--batch-size 64] [--top 12]

Part of `make bench`; its "peer" is the machine's own matmul peak. The model and pairs are
bench_blimp's (`build_model`, the first --pairs of every paradigm). For fp32 and bf16:

1. Throughput: `Scorer.score` over every pair after a warm-up batch; the model arithmetic it
   runs per second: 2 FLOPs per weight of the decoder layers per token it runs (a pair's shared
   prefix once: `eval.share_prefix`) and of the LM head per position whose logits it reads,
   attention scores left out.
2. The machine's matmul peak at the model's shapes: `F.linear` of 64 × 16 token rows through
   each of the model's weight shapes (768 → 768, 768 → 1760, 1760 → 768, 768 → 16000), best of
   several runs each; the peak is the best shape's FLOP/s. Throughput ÷ peak is the share.
3. A torch.profiler table of one scoring pass: the top operators by their own CPU time and
   their share of the total.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request
from vlmerge.hf import quiet_transformers

from bench_blimp import SHARED_BLIMP, build_model, load_pairs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = 64 * 16  # a batch of 64 sentences of ~16 tokens


def matmul_flops(model) -> tuple[int, int]:
    """FLOPs per token of the decoder layers' weights, and per logit row of the LM head (2 per weight)."""
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    return 2 * layers, 2 * model.lm_head.weight.numel()


def peak(dtype: torch.dtype, shapes: list[tuple[int, int]], repeats: int = 20) -> float:
    """Best FLOP/s of F.linear over the model's weight shapes, ROWS token rows."""
    best = 0.0
    for d_in, d_out in shapes:
        x, w = torch.randn(ROWS, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
        F.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        best = max(best, 2 * ROWS * d_in * d_out * repeats / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blimp", type=Path, default=SHARED_BLIMP, help="a folder of BLiMP <UID>.jsonl files")
    ap.add_argument("--pairs", type=int, default=15, help="pairs per paradigm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    pairs, every, _ = load_pairs(args.blimp, args.pairs)
    sentences = [s for pair in pairs for s in pair]
    requests = [Request(s, group=i // 2) for i, s in enumerate(sentences)]
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "model"
        build_model(model_dir, every, every[0::2], 5, 1760)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            models = {k: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval() for k in DTYPES}
    tokens = sum(len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"])
    cfg = models["fp32"].config
    shapes = [(cfg.hidden_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size),
              (cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.vocab_size)]
    layer_flops, head_flops = matmul_flops(models["fp32"])
    for name, dtype in DTYPES.items():
        scorer = Scorer(models[name], tokenizer, dtype=name, batch_size=args.batch_size)
        prepared = scorer.prepare(requests)
        run = sum(int((b.segments >= 0).sum()) for b in prepared.batches)
        rows = sum(int(b.keep.sum()) for b in prepared.batches)
        if name == "fp32":
            print(f"profile: {len(pairs)} BLiMP pairs, {tokens} tokens, {run} run (shared prefixes once), "
                  f"{rows} logit rows, batch {args.batch_size}, {torch.get_num_threads()} threads, "
                  f"{layer_flops / 1e6:.0f} MFLOP per token + {head_flops / 1e6:.0f} per logit row")
        scorer.score(requests[: args.batch_size])
        t0 = time.perf_counter()
        scorer.score(prepared)
        seconds = time.perf_counter() - t0
        achieved, best = (layer_flops * run + head_flops * rows) / seconds, peak(dtype, shapes)
        print(f"\n== {name}: {len(pairs) / seconds:.1f} pairs/s, {achieved / 1e12:.3f} TFLOP/s of model "
              f"arithmetic; matmul peak at the model's shapes {best / 1e12:.3f} TFLOP/s: {achieved / best:.0%} of it")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            scorer.score(prepared)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        for e in events[: args.top]:
            print(f"  {e.key[:48]:48} {e.self_cpu_time_total / 1e6:7.2f} s  {e.self_cpu_time_total / total:6.1%}"
                  f"  ({e.count} calls)")


if __name__ == "__main__":
    main()
