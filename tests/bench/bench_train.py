"""Training step time: our DeepSpeed loop against a bare PyTorch loop on the same batches.

    .venv/bin/python tests/bench/bench_train.py [--steps 20] [--hidden 512] [--layers 6]

Both start from the same weights and see the same batches of the demo world. The bare loop
is the least a trainer must do: forward, backward, clip, AdamW, LR schedule, on inputs
collated beforehand. Ours is `Trainer._step`: collation from the token shards, the DeepSpeed
engine (gloo, one rank), loss bookkeeping. Goal: ours <= 1.15x the bare step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmerge.precompute import corpus, tokenizer
from vlmerge.precompute.features import precompute
from vlmerge.config import load_config
from vlmerge.data import epoch_order, plan_batches
from vlmerge.demo import generate
from vlmerge.model import init_model
from vlmerge.train import distributed
from vlmerge.train.loop import Trainer, _optimizer
from vlmerge.train.schedule import lr_factor


def median_step(fn, batches, warmup: int = 3) -> float:
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        fn(b)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        generate(root / "demo", 0, text_words=20_000, n_images=300, n_winoground=10, pairs_per_phenomenon=10,
                 progress=False)
        cfg = load_config(None, [
            f"paths.root={root}", "tokenizer.vocab_size=4000", "features.num_workers=0",
            f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=8",
            f"model.intermediate_size={4 * args.hidden}", f"train.micro_batch_size={args.batch}",
        ])
        tokenizer.run(cfg, progress=False)
        corpus.run(cfg)
        precompute(cfg, progress=False)

        rank, world = distributed.setup()
        trainer = Trainer(cfg, "multimodal", rank, world, progress=False)
        order = epoch_order(len(trainer.samples), cfg.train.seed, 0)
        batches = list(plan_batches(order, trainer.samples.words, trainer.global_batch, [], 0))[: args.steps]
        inputs = [trainer.collate(b.pieces) for b in batches]

        bare = init_model(trainer.engine.module.config, cfg.model.init_seed).train()
        opt = _optimizer(bare, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 1000, 0.1))

        def bare_step(x):
            loss = bare(**x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        trainer.engine.train()  # as Trainer.fit does
        ours_s = [median_step(trainer._step, batches)]
        bare_s = [median_step(bare_step, inputs)]
        ours_s.append(median_step(trainer._step, batches))  # interleaved: best of two each
        bare_s.append(median_step(bare_step, inputs))

    params = sum(p.numel() for p in bare.parameters()) / 1e6
    tokens = statistics.mean(int(x["attention_mask"].sum()) for x in inputs)
    o, b = min(ours_s), min(bare_s)
    print(f"train step: {params:.1f}M-parameter model ({args.layers} layers, hidden {args.hidden}), batch "
          f"{args.batch} (~{tokens:.0f} tokens), fp32, CPU, {torch.get_num_threads()} threads, median of "
          f"{args.steps - 3} steps")
    print(f"  bare PyTorch loop    : {1000 * b:8.1f} ms/step")
    print(f"  vlmerge (DeepSpeed)  : {1000 * o:8.1f} ms/step")
    print(f"  ratio (ours / bare)  : {o / b:8.2f}x   (goal <= 1.15x)")


if __name__ == "__main__":
    main()
