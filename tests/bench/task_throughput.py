"""Items per second of each BabyLM task on the 63M Llama of bench_blimp.py (fp32, CPU).

    .venv/bin/python tests/bench/task_throughput.py [--train-steps 5] [--items 300]

Not part of `make bench` (no peer to compare with). The model and tokenizer are bench_blimp's
`build_model` (trained for --train-steps batches only: throughput does not depend on training).
The data are in the official formats: real BLiMP (the first --items/67 pairs of every paradigm),
and files written here for the others (the demo world's entity-tracking and wug generators; COMPS
and reading rows, made-up past tenses and AoA contexts from templates). Each task is timed once
from its requests to its metrics (tokenisation, scoring and the metric included; loading
excluded). AoA's items are its (word, context) pairs: one checkpoint's part of the series.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmerge.demo.babylm_tasks import entity_stories, wug_items
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import get_task
from vlmerge.hf import quiet_transformers
from vlmerge.problems import ProblemLog

from bench_blimp import SHARED_BLIMP, build_model, load_pairs

THINGS = ["apple", "ball", "book", "box", "cake", "car", "cup", "hat", "key", "kite", "lamp", "shoe", "toy"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def comps_rows(n: int, rng: random.Random) -> list[dict]:
    animals = [("robin", "can fly."), ("dog", "barks."), ("cat", "purrs."), ("fish", "can swim."), ("cow", "gives milk.")]
    rows = []
    for _ in range(n):
        (a, prop), (b, _) = rng.sample(animals, 2)
        rows.append({"prefix_acceptable": f"A wug is a {a}. Therefore, a wug",
                     "prefix_unacceptable": f"A dax is a {b}. Therefore, a dax", "property_phrase": prop})
    return rows


def reading_rows(n: int, rng: random.Random) -> list[dict]:
    words = "the old dog ran quickly to a small house where it was sleeping all day long".split()
    rows, text = [], []
    for k in range(n):
        if k % 15 == 0:
            text = []
        w = words[k % len(words)]
        rt = {m: f"{200 + 20 * len(w) + rng.gauss(0, 30):.2f}" for m in
              ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound", "self_paced_reading_time")}
        rows.append({"item": " ".join(text), "word": w, "prev_item": " ".join(text[:-1]) if len(text) > 1 else "",
                     "prev_word": text[-1] if text else "", **rt, "Subtlex_log10": f"{rng.uniform(1, 5):.3f}",
                     "length": len(w), "context_length": len(text), "prev_length": len(text[-1]) if text else ""})
        text.append(w)
    return rows


def wug_past_rows(n: int, rng: random.Random) -> list[dict]:
    """Made-up verbs with a regular and an irregular past, and a made-up share for the regular one."""
    rows = []
    for _ in range(n):
        onset, rime = rng.choice(("spl", "gl", "fr", "bl", "str")), rng.choice(("ing", "ink", "im"))
        regular, irregular = f"{onset}{rime}ed", f"{onset}{rime.replace('i', 'a')}"
        rows.append({"sentences": f"Yesterday she {regular}.\tYesterday she {irregular}.",
                     "ratio": round(rng.random(), 2)})
    return rows


def aoa_words(n: int, rng: random.Random) -> dict[str, list[dict]]:
    """AoA_word's cdi_childes.json: `n` contexts, five per word, from child-directed templates."""
    frames = ("look at the", "where is your", "do you want the", "give me that", "I see a")
    words = [f"{w}{k}" if k else w for k in range(n // 5 // len(THINGS) + 1) for w in THINGS][: max(1, n // 5)]
    return {w: [{"context": f"{rng.choice(frames)}"} for _ in range(5)] for w in words}


def datasets(tmp: Path, blimp: Path, items: int) -> dict[str, Path]:
    rng = random.Random(0)
    per = max(1, items // 67)
    for f in sorted(blimp.glob("*.jsonl")):
        write_jsonl(tmp / "blimp" / f.name, [json.loads(x) for x in f.read_text().splitlines()[:per]])
    write_jsonl(tmp / "entity_tracking" / "regular.jsonl", entity_stories(THINGS, items, rng))
    write_jsonl(tmp / "wug_adj_nominalization" / "wug_adj_nominalization.jsonl", wug_items(items, rng))
    write_jsonl(tmp / "wug_past_tense" / "wug_past_tense.jsonl", wug_past_rows(items, rng))
    write_jsonl(tmp / "comps" / "comps_wugs.jsonl", comps_rows(items, rng))
    (tmp / "cdi_childes").mkdir()
    (tmp / "cdi_childes" / "cdi_childes.json").write_text(json.dumps(aoa_words(items, rng)))
    rows = reading_rows(items, rng)
    (tmp / "reading").mkdir()
    with open(tmp / "reading" / "reading_data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"blimp": tmp / "blimp", "entity_tracking": tmp / "entity_tracking",
            "wug_adj": tmp / "wug_adj_nominalization", "wug_past": tmp / "wug_past_tense", "comps": tmp / "comps",
            "reading": tmp / "reading", "aoa": tmp / "cdi_childes"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blimp", type=Path, default=SHARED_BLIMP, help="a folder of BLiMP <UID>.jsonl files")
    ap.add_argument("--items", type=int, default=300, help="items per task (BLiMP: per 67 paradigms)")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    _, every, _ = load_pairs(args.blimp, 1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        built = build_model(tmp / "model", every, every[0::2], args.train_steps, 1760)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(tmp / "model").eval()
            tok = AutoTokenizer.from_pretrained(tmp / "model")
        print(f"model: {built['params']:.1f}M parameters, torch threads {torch.get_num_threads()}, fp32")
        for name, path in datasets(tmp, args.blimp, args.items).items():
            task = get_task(name)
            items = task.load(path, ProblemLog())
            scorer = Scorer(model, tok, batch_size=args.batch_size)
            t0 = time.perf_counter()
            reqs = task.requests(items)
            metrics, _ = task.evaluate(items, scorer.score(reqs))
            s = time.perf_counter() - t0
            head = next(m for m in metrics if m.subtask == "")
            n = len(reqs) if name == "aoa" else len(items)
            print(f"{name:<16} {n:>5} items {len(reqs):>5} requests {s:7.2f} s  {n / s:8.1f} items/s"
                  f"  ({head.metric} {head.value:.3f})")


if __name__ == "__main__":
    main()
