"""Signals of a model that cost a few seconds, for predicting its scores before evaluating it:

- `lm_loss`: the mean token loss on the first `sweep.probe_lines` lines of the dev text (held-out),
  each after the null image, as the text tasks see a sentence;
- `caption_loss` and `caption_loss_shuffled`: the mean token loss of as many captions of the
  training data with their own image's feature, and with another caption's (a seeded permutation);
- `grounding`: shuffled − true, how much the model still reads the image.

A probe set is built once per process (`ProbeSet.load`) and used for every model: the same
sequences, in the same batches, so signals of different models compare.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from vlmerge.config import Config
from vlmerge.data import Piece, run_data
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.run import TaskResult
from vlmerge.evaluate.tasks import Metric
from vlmerge.predict import PROBE
from vlmerge.problems import ProblemLog

LOSSES = ("lm_loss", "caption_loss", "caption_loss_shuffled")  # the mean losses, by the group of a sequence
SIGNALS = (*LOSSES, "grounding")
_BATCH_TOKENS = 8192  # rows × model.max_length per forward pass
_SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """The probe's sequences in batches, each row of one group of LOSSES: dev lines after the null
    image; captions with their image; the same captions with another caption's image."""

    batches: list[dict[str, torch.Tensor]]
    groups: list[torch.Tensor]  # per batch: each row's index into LOSSES
    lines: int

    @classmethod
    def load(cls, cfg: Config) -> ProbeSet:
        n = cfg.sweep.probe_lines
        if not cfg.data.dev_text:
            raise VlmergeError("sweep.probe: data.dev_text names no dev text for the probe's held-out loss")
        data = run_data(cfg, ["captions"], ProblemLog())
        lines = []
        for path in cfg.data.dev_text:
            with open(path, encoding="utf-8") as f:
                lines += [line.strip() for line in f if line.strip()][: n - len(lines)]
        if not lines:
            raise VlmergeError(f"{cfg.data.dev_text[0]}: no lines for the probe's held-out loss")
        collate, words = data.collate, data.samples.words
        text = [collate.text_sequence(t) for t in data.tokenizer(lines, add_special_tokens=False)["input_ids"]]
        null = collate.samples.features.null
        with_image = np.flatnonzero(data.samples.feature_row >= 0)[:n]
        if len(with_image) < 2:
            raise VlmergeError("sweep.probe: fewer than 2 captions with an image feature for the caption loss")
        pieces = [Piece(int(i), 0, int(words[i])) for i in with_image]
        captions = [collate.sequence(p) for p in pieces]
        images = collate(pieces)["pixel_values"]
        # every caption gets another caption's image: a derangement of the probe's images
        order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(pieces))
        other = torch.from_numpy(np.roll(order, 1)[np.argsort(order)])
        seqs = text + captions + captions
        feats = torch.cat([null.expand(len(text), *null.shape), images, images[other]])
        groups = torch.tensor([0] * len(text) + [1] * len(captions) + [2] * len(captions))
        rows = max(1, _BATCH_TOKENS // cfg.model.max_length)
        starts = range(0, len(seqs), rows)
        return cls([collate.pad(seqs[i: i + rows], feats[i: i + rows]) for i in starts],
                   [groups[i: i + rows] for i in starts], len(text))


def mean_losses(model: torch.nn.Module, probe: ProbeSet) -> dict[str, float]:
    """Per group of LOSSES, the mean token loss over its every target token (not a mean of means)."""
    device = next(model.parameters()).device
    sums, counts = torch.zeros(len(LOSSES), dtype=torch.float64), torch.zeros(len(LOSSES), dtype=torch.float64)
    with torch.inference_mode():
        for batch, group in zip(probe.batches, probe.groups):
            b = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**b).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            sums.index_add_(0, group, nll.sum(1).double().cpu())
            counts.index_add_(0, group, (labels != -100).sum(1).double().cpu())
    return {name: float(s / c) if c else math.nan for name, s, c in zip(LOSSES, sums, counts)}


def signals(model: torch.nn.Module, probe: ProbeSet, name: str) -> dict[str, float]:
    """The probe's signals of one model (SIGNALS); `name` names the model in the error when a loss is not
    finite (its weights, or a merge, give NaN: a NaN signal would steer the adaptive search blindly)."""
    out = mean_losses(model, probe)
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise VlmergeError(f"{name}: probe: the {bad[0]} is {out[bad[0]]}; the model's weights, the image features "
                           "or the merge give no finite losses")
    return out | {"grounding": out["caption_loss_shuffled"] - out["caption_loss"]}


def probe_result(values: dict[str, float], probe: ProbeSet) -> TaskResult:
    """The signals as result rows of the task `probe` (n: the dev lines)."""
    return TaskResult(PROBE, [Metric("", name, float(values[name]), probe.lines) for name in SIGNALS], [])
