"""BLiMP scoring throughput: our Scorer against minicons, same model, same pairs, same run.

    .venv/bin/python tests/bench/bench_blimp.py [--pairs 15 | --full] [--batch-size 64] [--blimp DIR]

The pairs are real BLiMP (`../shared/data/blimp`): the first --pairs of each of the 67
paradigms (default 15: 1005 pairs, about 2.5 min in all on 2 cores), or all 67,000 with --full
(about an hour). The model is built here: a 6-layer `LlamaForCausalLM` (hidden 768, vocab
16000, untied, ~63M parameters) with a byte-level BPE tokenizer trained on the BLiMP sentences
by `precompute.tokenizer.train_bpe` (BLiMP's vocabulary is used up below 16000 tokens). A random
model predicts almost uniformly, so good and bad sentences would differ by little more than
rounding noise; the model is therefore first trained for --train-steps batches of 16 BLiMP good
sentences (plain PyTorch, AdamW, bf16 autocast), which gives it real preferences (its BLiMP
accuracy and median |good - bad| are printed), and then saved to disk.

The peer is minicons (`.venv-peers/bin/python`, a helper script run as a subprocess that
reads the sentences from a JSON file and writes its scores and times to another):
`IncrementalLMScorer(dir, "cpu")` (fp32), then `sequence_score(32 sentences,
reduction=sum, bos_token=False)` per batch: the summed log-probability of every token after the
first, which is context only, as ours (the BabyLM pipeline's rule for a tokenizer, like this one,
that adds no BOS). Ours is `vlmerge.evaluate.scoring.Scorer.score` on the same
directory's model, in fp32 and in bf16 (its own copy, the weights cast to bf16 once; no autocast);
both compute logits only at the scored positions, the log-softmax in fp32, with SDPA's math
kernel, and run a pair's common prefix once (`eval.share_prefix`; minicons: the model's defaults,
SDPA's flash kernel, logits at every position, every sentence whole). Each side is timed around its scoring loop only
(tokenisation included, model load excluded) after one warm-up batch, with the same torch
thread count; the three runs are interleaved, best of --repeats. Goals (issue 16): ours >= 7x
minicons in bf16 and >= 1.8x in fp32; the decision (good > bad) of ours-fp32 the same as minicons' on
>= 99.9% of pairs, of ours-bf16 the same as ours-fp32's on >= 99.5%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlmerge.precompute.tokenizer import train_bpe
from vlmerge.config import TokenizerConfig
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request
from vlmerge.hf import quiet_transformers

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
SHARED_BLIMP = REPO.parent / "shared" / "data" / "blimp"  # CI puts ../shared beside the checkout

# Written to a temp dir at run time and run by the peers' python: scores every sentence with
# minicons in batches of `batch_size`, timing the scoring loop only (model load excluded).
PEER_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import torch
    from minicons import scorer

    job = json.load(open(sys.argv[1]))
    torch.set_num_threads(job["threads"])
    lm = scorer.IncrementalLMScorer(job["model"], "cpu")
    sentences, bs = job["sentences"], job["batch_size"]
    total = lambda x: x.sum(0).item()
    bos = job["bos"]
    lm.sequence_score(sentences[:bs], reduction=total, bos_token=bos)  # warm-up
    t0 = time.perf_counter()
    scores = []
    for i in range(0, len(sentences), bs):
        scores += lm.sequence_score(sentences[i : i + bs], reduction=total, bos_token=bos)
    seconds = time.perf_counter() - t0
    json.dump({"scores": scores, "seconds": seconds, "dtype": str(lm.model.dtype)}, open(sys.argv[2], "w"))
''')


def load_pairs(folder: Path, per_paradigm: int | None) -> tuple[list[tuple[str, str]], list[str], int]:
    """(good, bad) pairs: the first `per_paradigm` of each paradigm (all if None); all sentences; paradigms."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        sys.exit(f"bench_blimp: {folder}: no BLiMP <UID>.jsonl files (--blimp)")
    pairs, every = [], []
    for f in files:
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        every += [s for r in rows for s in (r["sentence_good"], r["sentence_bad"])]
        pairs += [(r["sentence_good"], r["sentence_bad"]) for r in rows[:per_paradigm]]
    return pairs, every, len(files)


def build_model(out: Path, sentences: list[str], goods: list[str], steps: int, intermediate: int,
                seed: int = 0) -> dict:
    """Save a BPE tokenizer and a briefly trained LlamaForCausalLM to `out`; return facts about them."""
    tok = train_bpe(sentences, TokenizerConfig(vocab_size=16_000), progress=False)
    config = LlamaConfig(
        vocab_size=16_000, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=intermediate, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = [[tok.bos_token_id] + x for x in tok(goods, add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up over the first 10% of the steps
            group["lr"] = 1e-3 * min(1.0, (step + 1) / max(1, steps // 10))
        rows = [ids[i] for i in rng.integers(0, len(ids), 16)]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for r, seq in enumerate(rows):
            x[r, : len(seq)] = labels[r, : len(seq)] = torch.tensor(seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    with quiet_transformers():
        model.eval().save_pretrained(out)
        tok.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": len(tok),
            "loss": float(np.mean(losses[-10:])) if losses else float("nan"), "seconds": train_s}


def peer(tmp: Path, model_dir: Path, sentences: list[str], threads: int, bos: bool = True) -> tuple[np.ndarray, float]:
    """minicons: (scores, seconds of its scoring loop), from its own process; `bos`: a BOS first, every
    token scored (else the first token is context only, as the BabyLM pipeline scores a tokenizer
    that adds no BOS)."""
    script, job, result = tmp / "peer_minicons.py", tmp / "peer_job.json", tmp / "peer_result.json"
    script.write_text(PEER_SCRIPT)
    job.write_text(json.dumps({"model": str(model_dir), "sentences": sentences, "batch_size": 32,
                               "threads": threads, "bos": bos}))
    done = subprocess.run([str(PEER_PYTHON), str(script), str(job), str(result)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_blimp: minicons failed ({PEER_PYTHON}):\n{done.stderr[-3000:]}")
    r = json.loads(result.read_text())
    assert r["dtype"] == "torch.float32", r["dtype"]
    return np.array(r["scores"], dtype=np.float64), r["seconds"]


def ours(model, tokenizer, requests: list[Request], dtype: str, batch_size: int) -> tuple[np.ndarray, float]:
    """Scorer.score: (scores, seconds), after a warm-up batch."""
    scorer = Scorer(model, tokenizer, dtype=dtype, batch_size=batch_size)
    scorer.score(requests[:batch_size])  # warm-up, as for the peer
    t0 = time.perf_counter()
    scores = scorer.score(requests)
    return scores.logprob, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blimp", type=Path, default=SHARED_BLIMP, help="a folder of BLiMP <UID>.jsonl files")
    ap.add_argument("--pairs", type=int, default=15, help="pairs per paradigm (default 15; --full: all)")
    ap.add_argument("--full", action="store_true", help="all 67,000 pairs")
    ap.add_argument("--batch-size", type=int, default=64, help="ours (minicons: 32)")
    ap.add_argument("--train-steps", type=int, default=60, help="batches of 16 good sentences")
    ap.add_argument("--intermediate-size", type=int, default=1760)
    ap.add_argument("--repeats", type=int, help="interleaved runs, best of each (default 2; --full: 1)")
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.full else 2)
    if not PEER_PYTHON.is_file():
        sys.exit(f"bench_blimp: {PEER_PYTHON} missing; run `make peers`")
    pairs, every, paradigms = load_pairs(args.blimp, None if args.full else args.pairs)
    sentences = [s for pair in pairs for s in pair]
    requests = [Request(s, group=i // 2) for i, s in enumerate(sentences)]
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = tmp / "model"
        built = build_model(model_dir, every, every[0::2], args.train_steps, args.intermediate_size)
        with quiet_transformers():
            # One model per dtype: a bf16 Scorer casts its model's weights to bf16 in place.
            models = {dtype: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                      for dtype in ("fp32", "bf16")}
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runs: dict[str, list[tuple[np.ndarray, float]]] = {"minicons": [], "fp32": [], "bf16": []}
        for _ in range(args.repeats):  # interleaved, best of each
            runs["minicons"].append(peer(tmp, model_dir, sentences, threads, bos=False))
            for dtype in ("fp32", "bf16"):
                runs[dtype].append(ours(models[dtype], tokenizer, requests, dtype, args.batch_size))

    n = len(pairs)
    rate = {k: n / min(seconds for _, seconds in v) for k, v in runs.items()}
    score = {k: v[0][0] for k, v in runs.items()}
    good_wins = {k: s[0::2] > s[1::2] for k, s in score.items()}
    agree_fp32 = float(np.mean(good_wins["fp32"] == good_wins["minicons"]))
    agree_bf16 = float(np.mean(good_wins["bf16"] == good_wins["fp32"]))
    max_diff = float(np.max(np.abs(score["fp32"] - score["minicons"])))
    gap = np.abs(score["fp32"][0::2] - score["fp32"][1::2])
    full_min = 67_000 * sum(1 / r for r in rate.values()) / 60
    which = "all" if args.full else f"first {args.pairs} of each"
    print(f"blimp scoring: {n} pairs ({which} of {paradigms} paradigms), {built['params']:.1f}M-parameter Llama "
          f"(6 layers, hidden 768, vocab 16000, untied; BPE {built['tokens']} tokens), CPU, {threads} threads, "
          f"best of {args.repeats}")
    print(f"  model: trained {args.train_steps} x 16 BLiMP good sentences in {built['seconds']:.0f} s, loss "
          f"{built['loss']:.2f}; BLiMP accuracy {good_wins['fp32'].mean():.1%}, median |good - bad| "
          f"{np.median(gap):.2f} nats")
    print(f"  minicons, batch 32, fp32 : {rate['minicons']:8.1f} pairs/s   (its scoring loop; model load not timed)")
    print(f"  vlmerge, batch {args.batch_size}, fp32  : {rate['fp32']:8.1f} pairs/s")
    print(f"  vlmerge, batch {args.batch_size}, bf16  : {rate['bf16']:8.1f} pairs/s")
    print(f"  ratio fp32 (ours / peer) : {rate['fp32'] / rate['minicons']:8.2f}x   (goal >= 1.8x)")
    print(f"  ratio bf16 (ours / peer) : {rate['bf16'] / rate['minicons']:8.2f}x   (goal >= 7x)")
    print(f"  decisions fp32 = minicons: {agree_fp32:8.2%}   (goal >= 99.9%)")
    print(f"  decisions bf16 = fp32    : {agree_bf16:8.2%}   (goal >= 99.5%)")
    print(f"  max |fp32 - minicons|    : {max_diff:8.1e} nats per sentence")
    if not args.full:
        print(f"  --full (67,000 pairs): ~{full_min:.0f} min of scoring per repeat at these rates")


if __name__ == "__main__":
    main()
