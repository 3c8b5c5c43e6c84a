"""The demo world's multimodal effect on a trained model: it answers colour questions from the
image, and at chance once every image is swapped for another's (`vlmerge eval --shuffle-features`)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import vlmerge_cli
from vlmerge.layout import list_checkpoints

CHANCE = 1 / 8  # the demo VQA's 8 colours, each the answer equally often


def accuracy_interval(correct: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of 0/1 outcomes."""
    means = np.random.default_rng(seed).choice(correct, (resamples, len(correct))).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@pytest.mark.slow  # trains the multimodal twin on the demo's captions and picture talk (about 30 s)
def test_the_multimodal_twin_answers_from_the_image_and_at_chance_without_it(make_cfg):
    cfg = make_cfg()
    root = Path(cfg.paths.root)
    common = [f"paths.root={root}", "features.num_workers=0"]
    for stage in ("tokenizer", "corpus", "precompute"):
        r = vlmerge_cli(stage, "--quiet", *common)
        assert r.returncode == 0, r.stderr
    # Captions only, one epoch: the picture talk is the one place where colour questions are answered.
    r = vlmerge_cli("train", "--quiet", "--run", "multimodal", *common, "runs.multimodal.sources=[captions]",
                    "runs.multimodal.epochs=1", "checkpoints.words=[]", "checkpoints.every_epoch=true")
    assert r.returncode == 0, r.stderr
    model = list_checkpoints(cfg.layout.run_dir("multimodal"))[-1]

    def vqa_correct(*control: str) -> np.ndarray:
        out = root / f"eval{len(control)}"
        r = vlmerge_cli("eval", "--quiet", "--model", str(model), "--task", "vqa", *control, *common, "--out", str(out))
        assert r.returncode == 0, r.stderr
        items = pd.read_parquet(out / "items.parquet")
        return items[items.task == "vqa"].value.to_numpy(dtype=float)

    real, shuffled = vqa_correct(), vqa_correct("--shuffle-features", "0")
    assert len(real) == len(shuffled) == 150
    low, _ = accuracy_interval(real)
    assert real.mean() >= CHANCE + 0.15 and low > CHANCE
    low, high = accuracy_interval(shuffled)
    assert low <= CHANCE <= high and shuffled.mean() < CHANCE + 0.08
