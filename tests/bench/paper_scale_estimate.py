"""The paper-scale sweep's cost on this machine: `vlmerge sweep plan --estimate` for Takmaz et al.

    .venv/bin/python tests/bench/paper_scale_estimate.py --root DIR [--dtype bf16] [--fast 16000] [--full 100000]

configs/babylm-takmaz2025.yaml, projected before training: the text twin 10 epochs of 50M words,
the multimodal twin 10 of 100M (text + captions), the BabyLM checkpoint schedule (28 multimodal
checkpoints to 1B words), each paired with one text checkpoint (best_text), linear at 11 α: 308
merged models and 29 unmerged checkpoints. BabyLM's evaluation data is not here, so the estimate
is calibrated on what is: real BLiMP (../shared/data/blimp) and the demo world's Winoground
(--root holds a built demo world, e.g. `make demo`'s outputs/). Its item counts stand for the
fast sets (--fast items, about 16k per model) and the full sets (--full, over 100k), Winoground
at its full 400: the other tasks are counted as BLiMP pairs (EWoK's and entity tracking's items
are longer: the full-set figure is a floor). The model calibrated is an untrained one of the
paper config's shape (6 layers, width 768, its vocabulary of 30,000), its tokenizer the config's
recipe trained on BLiMP (built here, in a temp folder; BLiMP's words need fewer tokens, the model
has the config's head).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from vlmerge.config import load_config
from vlmerge.data import FeatureTable
from vlmerge.hf import quiet_transformers
from vlmerge.model import build_config, init_model
from vlmerge.precompute.tokenizer import train_bpe

from bench_blimp import SHARED_BLIMP, load_pairs

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "babylm-takmaz2025.yaml"


def stand_in(folder: Path, root: Path) -> Path:
    """An untrained model of the paper config's shape with its recipe's tokenizer trained on BLiMP."""
    cfg = load_config(PAPER, [f"paths.root={root}"])
    _, sentences, _ = load_pairs(SHARED_BLIMP, None)
    tokenizer = train_bpe(sentences, cfg.tokenizer, progress=False)
    features = FeatureTable(root / "features" / "demo.h5")  # the demo's Winoground images
    # BLiMP's words make fewer tokens: the model is padded to the config's 30,000 rows
    model = cfg.model.model_copy(update={"vocab_size": cfg.tokenizer.vocab_size})
    config = build_config(model, tokenizer, features.dim, cfg.features.layer)
    with quiet_transformers():
        init_model(config, 0).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path, help="an output root holding the demo world and its features")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="eval.dtype (the paper config's: fp32)")
    ap.add_argument("--fast", type=int, default=16000, help="items per model of the fast sets")
    ap.add_argument("--full", type=int, default=100000, help="items per model of the full sets")
    args = ap.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        model = stand_in(Path(tmp) / "model", root)
        for name, items in (("fast", args.fast), ("full", args.full)):
            cmd = [sys.executable, "-m", "vlmerge", "sweep", "plan", "--estimate", "--config", str(PAPER),
                   f"paths.root={tmp}", "--words-per-epoch", "text=50000000", "--words-per-epoch", "multimodal=100000000",
                   "--calibrate-with", str(model), "--items", f"blimp={items - 400}", "--items", "winoground=400",
                   f"eval.tasks={{blimp: {SHARED_BLIMP}, winoground: {root}/demo/eval/winoground.jsonl}}",
                   f"eval.features={root}/features/demo.h5", f"eval.dtype={args.dtype}", "sweep.tasks=[blimp, winoground]",
                   f"sweep.best_text_data={SHARED_BLIMP}"]  # the whole real BLiMP picks the text checkpoint
            print(f"== the {name} sets: {items:,} items per model ({args.dtype})", flush=True)
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
