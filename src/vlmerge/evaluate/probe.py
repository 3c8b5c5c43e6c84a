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

SIGNALS = ("lm_loss", "caption_loss", "caption_loss_shuffled", "grounding")
_BATCH = 64
_SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """The probe's batches: dev lines after the null image; captions with their image and with another's."""

    text: list[dict[str, torch.Tensor]]
    captions: list[dict[str, torch.Tensor]]
    shuffled: list[dict[str, torch.Tensor]]

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
        tokens = data.tokenizer(lines, add_special_tokens=False)["input_ids"]
        null = collate.samples.features.null
        text = [collate.pad([collate.text_sequence(t) for t in tokens[i: i + _BATCH]],
                            null.expand(len(tokens[i: i + _BATCH]), *null.shape).clone())
                for i in range(0, len(tokens), _BATCH)]
        with_image = np.flatnonzero(data.samples.feature_row >= 0)[:n]
        if len(with_image) < 2:
            raise VlmergeError("sweep.probe: fewer than 2 captions with an image feature for the caption loss")
        pieces = [Piece(int(i), 0, int(words[i])) for i in with_image]
        captions = [collate(pieces[i: i + _BATCH]) for i in range(0, len(pieces), _BATCH)]
        # every caption gets another caption's image: a derangement of the probe's images
        order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(pieces))
        other = np.roll(order, 1)[np.argsort(order)]
        feats = torch.cat([b["pixel_values"] for b in captions])[torch.from_numpy(other)]
        shuffled, start = [], 0
        for b in captions:
            shuffled.append(b | {"pixel_values": feats[start: start + len(b["input_ids"])]})
            start += len(b["input_ids"])
        return cls(text, captions, shuffled)


def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """The mean token loss over every target token of `batches` (not the mean of batch means)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**b).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / count if count else math.nan


def signals(model: torch.nn.Module, probe: ProbeSet) -> dict[str, float]:
    """The probe's signals of one model (SIGNALS)."""
    out = {"lm_loss": mean_loss(model, probe.text), "caption_loss": mean_loss(model, probe.captions),
           "caption_loss_shuffled": mean_loss(model, probe.shuffled)}
    return out | {"grounding": out["caption_loss_shuffled"] - out["caption_loss"]}


def probe_result(values: dict[str, float], probe: ProbeSet) -> TaskResult:
    """The signals as result rows of the task `probe` (n: the dev lines)."""
    lines = sum(len(b["input_ids"]) for b in probe.text)
    return TaskResult(PROBE, [Metric("", name, float(values[name]), lines) for name in SIGNALS], [])
