"""BabyLM's fine-tuning recipe (evaluation_pipeline/finetune/trainer.py), made fast.

The recipe is the pipeline's: AdamW over the base model and the head (weight decay on every
tensor), linear warm-up over the first `warmup_proportion` of the steps, then cosine decay to
`min_factor` of the rate; steps of `batch_size` examples in a random order, the last incomplete
batch of an epoch dropped; after every epoch the valid split is scored and the epoch with the best
`metric_for_valid` (strictly better than the earlier best) is kept; its valid scores are the
result and its arg-max labels the predictions.

What makes it fast, without changing the recipe: every split is tokenised once (the pipeline
tokenises each batch again in every epoch); an epoch's random order is cut into windows of
`BUCKET_BATCHES` batches, each window sorted by length jittered by ±`LENGTH_NOISE` before it is cut
into batches, and the batches shuffled, so that a batch holds inputs of similar length and little
padding; the kept epoch's scores are kept instead of a copy of the model that would be scored
again. Each example is seen once per epoch; its batch mates are not drawn uniformly, but the
jitter keeps them changing: on RTE-sized lengths (600–2,500 items, 20–300 tokens) an epoch pads
to about 0.4 of the tokens of random batches, and two items share a batch again in the next
epoch about 4× as often as random batches would have them (without the jitter, or with windows of
50 batches, up to 15×).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmerge.errors import VlmergeError
from vlmerge.finetune.classifier import SequenceClassifier
from vlmerge.finetune.metrics import classification_metrics
from vlmerge.finetune.tasks import Example, FinetuneTask

if TYPE_CHECKING:
    from vlmerge.data import FeatureTable

# Batches per length-sorted window, and the jitter of the lengths it is sorted by: similar lengths
# within a batch, and batches that still differ from epoch to epoch (AllenNLP's padding noise).
BUCKET_BATCHES = 16
LENGTH_NOISE = 0.2


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The fine-tuning hyperparameters of one task (FinetuneConfig.recipe)."""

    lr: float
    batch_size: int
    epochs: int
    seed: int
    max_length: int
    valid_batch_size: int
    dropout: float
    layer_norm_eps: float
    weight_decay: float
    warmup_proportion: float
    min_factor: float
    betas: tuple[float, float]
    eps: float
    padding_side: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The kept epoch's valid scores and predictions, and how the run went."""

    metrics: dict[str, float]
    preds: np.ndarray
    labels: np.ndarray
    best_epoch: int
    steps: int
    seconds: float
    soft: np.ndarray | None = None  # the valid examples' soft targets [examples, labels] (VQA), or None

    def item_scores(self) -> np.ndarray:
        """Each valid example's score: its prediction's soft target (their mean is VQA's `vqa_score`),
        or right (1) / wrong (0)."""
        if self.soft is not None:
            return self.soft[np.arange(len(self.preds)), self.preds].astype(float)
        return (self.preds == self.labels).astype(float)


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """How a multimodal model sees an example: its images' features from the store (the black
    image's for an example without images), each behind `image_text` (its image tokens) at the
    start of the A text, then a space (Takmaz et al.'s "<image> " + text)."""

    features: FeatureTable
    image_text: str

    def lead(self, example: Example) -> str:
        return self.image_text * max(len(example.images), 1) + " "

    def pixels(self, examples: Sequence[Example]) -> torch.Tensor:
        """`[images, (K,) D]`: every image of the examples in order, the black one for an example without."""
        ids = [i for e in examples for i in e.images]
        rows = self.features.rows(np.array(ids)) if ids else np.empty(0, dtype=np.int64)
        if (rows < 0).any():
            raise VlmergeError(f"image {ids[int(np.flatnonzero(rows < 0)[0])]!r} has no feature in the store")
        found = iter(self.features.features[rows].float())
        null = self.features.null
        return torch.stack([next(found) if e.images else null for e in examples for _ in (e.images or (None,))])


def encode(tokenizer, examples: Sequence[Example], max_length: int, images: ImageInputs | None = None) -> list[list[int]]:
    """Token ids of every example as the pipeline's collate function makes them (the tokenizer's own
    special tokens, pairs as pairs, truncated to `max_length`), unpadded; for a multimodal model
    (`images`) the A text after its image tokens."""
    a = [(images.lead(e) if images else "") + e.a for e in examples]
    b = [e.b for e in examples] if examples[0].b is not None else None
    return tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]


def soft_targets(examples: Sequence[Example], num_labels: int) -> np.ndarray | None:
    """`[examples, labels]` of the examples' soft targets (VQA's scores); None when they have none."""
    if not any(e.targets for e in examples):
        return None
    dense = np.zeros((len(examples), num_labels), dtype=np.float32)
    for row, e in enumerate(examples):
        for label, score in e.targets:
            dense[row, label] = score
    return dense


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) `[B, longest]`, padded on `side`."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: a random order without its last incomplete batch, sorted by jittered length
    within windows of BUCKET_BATCHES batches, cut into batches, the batches shuffled."""
    order = rng.permutation(len(lengths))[: len(lengths) // batch_size * batch_size]
    jittered = lengths * rng.uniform(1 - LENGTH_NOISE, 1 + LENGTH_NOISE, len(lengths))
    window = BUCKET_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(jittered[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def cosine_with_warmup(step: int, warmup: int, total: int, min_factor: float) -> float:
    """The pipeline's learning-rate factor at `step` (finetune/utils.py `cosine_schedule_with_warmup`)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(min_factor, min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Run:
    """One model fine-tuned on one task: its classifier, the tokenised splits and the optimiser."""

    def __init__(self, model: torch.nn.Module, tokenizer, task: FinetuneTask, splits: dict[str, list[Example]],
                 recipe: Recipe, *, images: ImageInputs | None = None, name: str = "the model"):
        self.task, self.recipe, self.images, self.examples = task, recipe, images, splits
        self.name = name  # the model fine-tuned, in errors
        if images is None and any(e.images for e in splits["train"]):
            raise VlmergeError(f"{task.name}: its examples show images, and this model reads none")
        self.device = device = next(model.parameters()).device
        self.num_labels = task.num_labels or 1 + max(max((t for t, _ in e.targets), default=e.label)
                                                     for e in splits["train"])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(recipe.seed)  # the head's initial weights (the pipeline seeds before building it)
            self.model = SequenceClassifier(model, self.num_labels, dropout=recipe.dropout,
                                            eps=recipe.layer_norm_eps).to(device)
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self.ids = {s: encode(tokenizer, examples, recipe.max_length, images) for s, examples in splits.items()}
        self.labels = {s: np.array([e.label for e in examples]) for s, examples in splits.items()}
        self.soft = {s: soft_targets(examples, self.num_labels) for s, examples in splits.items()}
        self.steps_per_epoch = len(self.ids["train"]) // recipe.batch_size
        if self.steps_per_epoch == 0:
            raise VlmergeError(f"{task.name}: {len(self.ids['train'])} training examples, fewer than one batch "
                             f"of {recipe.batch_size}")
        total = self.steps_per_epoch * recipe.epochs
        warmup = int(recipe.warmup_proportion * total)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                                           weight_decay=recipe.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, warmup, total, recipe.min_factor))

    def _batch(self, split: str, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The classifier's inputs for `rows` of a split: ids, mask and, for a multimodal model, pixels."""
        ids, mask = pad([self.ids[split][r] for r in rows], self.pad_id, self.recipe.padding_side)
        if self.images is None:
            return ids.to(self.device), mask.to(self.device)
        examples = [self.examples[split][r] for r in rows]
        multimodal = torch.tensor([bool(e.images) for e in examples], device=self.device)
        return ids.to(self.device), mask.to(self.device), self.images.pixels(examples).to(self.device), multimodal

    def _loss(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Cross-entropy with the labels; with soft targets (VQA) ViLT's binary cross-entropy with the
        scores, summed over the labels (its mean times their number)."""
        soft = self.soft["train"]
        if soft is None:
            return F.cross_entropy(logits, torch.from_numpy(self.labels["train"][rows]).to(self.device))
        targets = torch.from_numpy(soft[rows]).to(self.device)
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]

    def train_epoch(self, rng: np.random.Generator, bar: tqdm | None = None) -> None:
        self.model.train()
        lengths = np.array([len(s) for s in self.ids["train"]])
        for rows in epoch_batches(lengths, self.recipe.batch_size, rng):
            loss = self._loss(self.model(*self._batch("train", rows)), rows)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update()

    @torch.no_grad()
    def logits(self, split: str = "valid") -> np.ndarray:
        """`[examples, labels]` of a split, scored in length-sorted batches."""
        self.model.eval()
        order = np.argsort([len(s) for s in self.ids[split]], kind="stable")
        out = np.empty((len(order), self.num_labels), dtype=np.float32)
        for start in range(0, len(order), self.recipe.valid_batch_size):
            rows = order[start : start + self.recipe.valid_batch_size]
            out[rows] = self.model(*self._batch(split, rows)).float().cpu().numpy()
        return out

    def predict(self, split: str = "valid") -> np.ndarray:
        """Arg-max labels of a split."""
        return self.logits(split).argmax(-1)

    def run(self, progress: bool = False) -> Outcome:
        """Every epoch, keeping the one with the best valid `metric_for_valid`."""
        rng, start = np.random.default_rng(self.recipe.seed), time.perf_counter()
        best: tuple[float, int, dict[str, float], np.ndarray] | None = None
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), tqdm(total=self.steps_per_epoch * self.recipe.epochs, desc=f"finetune {self.task.name}",
                  disable=not progress, leave=False) as bar:
            torch.manual_seed(self.recipe.seed)  # the dropout masks: a rerun gives the same model
            for epoch in range(self.recipe.epochs):
                self.train_epoch(rng, bar)
                logits = self.logits()
                if not np.isfinite(logits).all():  # a NaN logit is the arg-max: the predictions would be noise
                    raise VlmergeError(f"{self.name}: finetune {self.task.name}: the valid logits of epoch {epoch + 1} "
                                       "are NaN or infinite (the model's weights, a merge, or a learning rate "
                                       "that diverged)")
                preds = logits.argmax(-1)
                metrics = classification_metrics(self.task.metrics, self.labels["valid"], preds, self.soft["valid"],
                                                 logits)
                score = metrics[self.task.metric_for_valid]
                if best is None or score > best[0]:
                    best = (score, epoch, metrics, preds)
                bar.set_postfix_str(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        _, epoch, metrics, preds = best
        return Outcome(metrics, preds, self.labels["valid"], epoch, self.steps_per_epoch * self.recipe.epochs,
                       time.perf_counter() - start, self.soft["valid"])
