"""Precompute throughput against the bare encoder forward, same images, same batch size.

    .venv/bin/python tests/bench/bench_precompute.py [--images 128] [--batch-size 32] [--workers 1]

The peer is the least any feature extractor must do: a `Dinov2Model` forward over pixel values
prepared beforehand (decoding and preprocessing not timed). Ours is the whole stage: decode,
preprocess, encode, pool, write the HDF5 shard, mark rows done. Goal: ours >= 0.9x the peer.
The encoder is a randomly initialised ViT-S/14 (DINOv2-small shape) at 224 px.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, Dinov2Model

from vlmerge.precompute.features import Runtime, gather_images, run_shard, store_attrs
from vlmerge.config import load_config
from vlmerge.demo.world import save_random_dinov2
from vlmerge.hf import quiet_transformers
from vlmerge.io import write_jsonl


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n photo-sized JPEGs (320x240) of random shapes, and their JSONL manifest."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = int(rng.integers(0, 280)), int(rng.integers(0, 200))
            draw.ellipse([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(folder / f"{i:05d}.jpg", quality=90)
        rows.append({"image_id": f"bench-{i:05d}", "path": f"images/{i:05d}.jpg", "caption": "shapes"})
    write_jsonl(folder.parent / "manifest.jsonl", rows)
    return folder.parent / "manifest.jsonl"


def bare_forward(encoder_dir: Path, manifest_images: list, batch_size: int) -> float:
    """Images/s of Dinov2Model(pixel_values) alone."""
    with quiet_transformers():
        model = Dinov2Model.from_pretrained(encoder_dir).eval()
        processor = AutoImageProcessor.from_pretrained(encoder_dir)
    batches = [
        processor(images=[Image.open(it.path).convert("RGB") for it in manifest_images[i : i + batch_size]],
                  return_tensors="pt")["pixel_values"]
        for i in range(0, len(manifest_images), batch_size)
    ]
    with torch.inference_mode():
        model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for px in batches:
            model(px)
        return len(manifest_images) / (time.perf_counter() - t0)


def ours(tmp: Path, encoder_dir: Path, manifest: Path, batch_size: int, workers: int, tag: str) -> float:
    """Images/s of the precompute loop over one shard (model load excluded, as for the peer)."""
    cfg = load_config(None, [
        f"paths.root={tmp / tag}", f"features.encoder={encoder_dir}", f"features.images=[{{manifest: '{manifest}'}}]",
        f"features.batch_size={batch_size}", f"features.num_workers={workers}", "features.name=bench",
        "features.dtype=float16",
    ])
    items, _ = gather_images(cfg)
    rt = Runtime.create(cfg.features)
    rt.encode(torch.zeros(1, 3, 224, 224))  # warm-up, as for the peer
    result = run_shard(cfg, rt, items, 0, 1, store_attrs(cfg, tag, rt), progress=False)
    assert result.encoded == len(items) and not result.failures
    return result.encoded / result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        manifest = make_images(tmp / "data" / "images", args.images)
        encoder_dir = save_random_dinov2(tmp / "encoder", 0, hidden_size=384, num_hidden_layers=12,
                                         num_attention_heads=6, mlp_ratio=4, image_size=224)
        items, _ = gather_images(load_config(None, [f"features.images=[{{manifest: '{manifest}'}}]"]))
        peer, mine = [], []
        for r in range(args.repeats):  # interleaved, best of each
            peer.append(bare_forward(encoder_dir, items, args.batch_size))
            mine.append(ours(tmp, encoder_dir, manifest, args.batch_size, args.workers, f"run{r}"))
    p, m = max(peer), max(mine)
    print(f"precompute: {args.images} images 320x240 JPEG -> ViT-S/14 @224, batch {args.batch_size}, "
          f"{args.workers} loader worker(s), {torch.get_num_threads()} threads")
    print(f"  bare encoder forward : {p:8.1f} images/s")
    print(f"  vlmerge precompute   : {m:8.1f} images/s")
    print(f"  ratio (ours / bare)  : {m / p:8.2f}x   (goal >= 0.9x)")


if __name__ == "__main__":
    main()
