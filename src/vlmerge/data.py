"""Training data: samples from token shards, a deterministic epoch order, and batches that end
exactly on the checkpoint schedule's word counts.

A sample is a corpus line, or, where a line's tokens do not fit `model.max_length`, a run of its
words that does: a long line is trained as several sequences (split between words, each with the
line's image, EOS after the last), so that every word counted as seen is a word trained on.

A batch is a list of pieces (sample, first word, end word). Normally a piece is a whole sample;
when a scheduled word count falls inside a sample, the batch ends with the sample's head and
the next batch starts with its tail, so that checkpoints land on the scheduled count exactly.
The position in an epoch is (cursor into the epoch's order, words of that sample consumed):
with the data seed it is all a resumed run needs to continue with the very same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from vlmerge.precompute.corpus import TokenShards
from vlmerge.precompute.tokenizer import load_tokenizer
from vlmerge.config import Config
from vlmerge.errors import VlmergeError
from vlmerge.problems import ProblemLog


@dataclasses.dataclass(frozen=True)
class Piece:
    sample: int
    start: int  # first word
    stop: int  # one past the last word


@dataclasses.dataclass(frozen=True)
class Batch:
    pieces: list[Piece]
    words: int
    cursor: int  # position in the epoch order after this batch
    offset: int  # words of the sample at `cursor` already consumed
    words_seen: int  # in the whole run, after this batch


def data_digest(previous: str, batch: Batch) -> str:
    """A running digest of the data a run has trained on: `previous` (hex, "" at the start) and the
    batch's pieces. Two runs that saw the same pieces in the same steps have the same digests."""
    h = hashlib.blake2b(bytes.fromhex(previous), digest_size=8)
    h.update(np.array([(p.sample, p.start, p.stop) for p in batch.pieces], dtype=np.int64).tobytes())
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n samples in `epoch`: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def plan_batches(
    order: np.ndarray, words: np.ndarray, batch_size: int, thresholds: Sequence[int],
    words_seen: int, cursor: int = 0, offset: int = 0,
) -> Iterator[Batch]:
    """Batches of up to `batch_size` pieces from (cursor, offset) to the end of the epoch.

    A batch ends early, splitting a sample if need be, when the run's words seen reach the
    next value of `thresholds` (sorted), so that a checkpoint can be taken there.
    """
    upcoming = [t for t in thresholds if t > words_seen]
    n = len(order)
    while cursor < n:
        budget = upcoming[0] - words_seen if upcoming else None
        pieces, taken = [], 0
        while len(pieces) < batch_size and cursor < n and budget != 0:
            sample = int(order[cursor])
            avail = int(words[sample]) - offset
            take = avail if budget is None else min(avail, budget)
            pieces.append(Piece(sample, offset, offset + take))
            taken += take
            budget = None if budget is None else budget - take
            if take == avail:
                cursor, offset = cursor + 1, 0
            else:
                offset += take
        words_seen += taken
        if upcoming and words_seen == upcoming[0]:
            upcoming.pop(0)
        yield Batch(pieces, taken, cursor, offset, words_seen)


def count_batches(order: np.ndarray, words: np.ndarray, batch_size: int, thresholds: Sequence[int], words_seen: int) -> int:
    """len(list(plan_batches(...))) from the start of an epoch, without building the batches."""
    w = words[order].astype(np.int64)
    ends = words_seen + np.cumsum(w)  # words seen after each whole sample
    if len(w) == 0:
        return 0
    inside = [t for t in thresholds if words_seen < t < ends[-1]]
    batches, first = 0, 0  # first: index of the segment's first piece's sample
    for t in inside:
        i = int(np.searchsorted(ends, t))  # the sample in which the threshold falls
        batches += -(-(i - first + 1) // batch_size)
        first = i + 1 if ends[i] == t else i
    return batches + -(-(len(w) - first) // batch_size)


_FINITE_BLOCK = 1 << 14  # rows per finiteness check of a feature store


class FeatureTable:
    """A linked feature store held in memory: rows by image id, and the null (black image) feature.

    A row is one vector [D], or, in a store of `features.grid` G > 1, G² cell vectors [G², D]: one
    image token each.
    """

    def __init__(self, path: Path):
        if not path.is_file():
            raise VlmergeError(f"{path}: feature store not found; run `vlmerge precompute` first")
        try:
            with h5py.File(path, "r") as f:
                rows, null, ids = f["features"], f["null_feature"], f["image_ids"]
                for name, d in (("features", rows), ("null_feature", null)):  # before reading: no string, int or bool
                    if d.dtype.kind != "f":
                        raise VlmergeError(f"{path}: {name} are {d.dtype}; expected floating-point numbers "
                                           "(float16 or float32)")
                if rows.ndim not in (2, 3) or null.shape != rows.shape[1:]:
                    raise VlmergeError(f"{path}: features of shape {list(rows.shape)} and a null_feature of shape "
                                       f"{list(null.shape)}; expected [N, D] (or [N, G², D]) and one row's shape")
                if ids.shape != rows.shape[:1] or h5py.check_string_dtype(ids.dtype) is None:
                    raise VlmergeError(f"{path}: image_ids are {ids.shape[0] if ids.ndim else 0} {ids.dtype} values "
                                       f"for {rows.shape[0]} feature rows; expected one string id per row")
                self.features = torch.from_numpy(rows[:])  # stored dtype (float16 halves the memory)
                self.null = torch.from_numpy(null[:].astype(np.float32))
                self.index = pd.Index(ids.asstr()[:])
        except (OSError, KeyError, TypeError, AttributeError) as e:  # truncated, or not a store (a group for a dataset)
            raise VlmergeError(f"{path}: not a readable feature store ({str(e).splitlines()[0][:120]}); "
                               "run `vlmerge precompute` again") from None
        if not self.index.is_unique:
            raise VlmergeError(f"{path}: image id {self.index[self.index.duplicated()][0]!r} has several rows; "
                               "expected each image once")
        self._check_finite(path)

    def _check_finite(self, path: Path) -> None:
        """Every row and the null feature hold finite numbers. The store is in memory already: one pass over
        it in blocks, each block's bool mask small (a mask of the whole table would take a byte per number)."""
        if not torch.isfinite(self.null).all():
            raise VlmergeError(f"{path}: the null_feature holds NaN or Inf; run `vlmerge precompute` again")
        for start in range(0, len(self.features), _FINITE_BLOCK):
            block = self.features[start : start + _FINITE_BLOCK]
            ok = torch.isfinite(block).flatten(1).all(1)
            if not ok.all():
                row = start + int(torch.nonzero(~ok)[0])
                raise VlmergeError(f"{path}: row {row} (image {self.index[row]!r}) holds NaN or Inf; expected finite "
                                   "features (recompute that image, or leave it out)")

    @property
    def dim(self) -> int:
        return int(self.null.shape[-1])

    @property
    def tokens(self) -> int:
        """Image tokens per image: 1, or G² for a grid store."""
        return 1 if self.null.dim() == 1 else int(self.null.shape[0])

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the store, -1 where the store has no feature for it."""
        return self.index.get_indexer(image_ids)

    def shuffle(self, seed: int) -> None:
        """Give every image another image's feature (a seeded derangement of the rows): a control
        that keeps the features' distribution and removes what they say about each image."""
        order = np.random.default_rng(seed).permutation(len(self.index))
        self.features[order] = self.features[np.roll(order, 1)].clone()  # a cycle through all rows: no fixed point


@dataclasses.dataclass(frozen=True)
class _Part:
    """A sample that is part of a long line: its tokens [lo, hi) of the line, and whether it ends it."""

    lo: int
    hi: int
    last: bool


def _word_starts_at(starts: np.ndarray, words: int) -> np.ndarray:
    """The position of each word's first token (`starts`: per token, whether it begins a word)."""
    at = np.flatnonzero(starts)
    if len(at) != words:
        raise VlmergeError(f"a sample has {words} words but {len(at)} word-start tokens; rebuild the corpus")
    return at


def split_line(starts: np.ndarray, words: int, budget: int) -> list[tuple[int, int, int]]:
    """A line as runs of whole words of at most `budget` tokens each: (words, first token, end token).
    A single word longer than `budget` is a run of its own (the collator cuts it)."""
    at = _word_starts_at(starts, words)
    ends = np.append(at[1:], len(starts))  # one past each word's last token
    runs, first = [], 0
    while first < words:
        lo = int(at[first]) if first else 0
        stop = max(int(np.searchsorted(ends, lo + budget, side="right")), first + 1)
        runs.append((stop - first, lo, int(ends[stop - 1])))
        first = stop
    return runs


class Samples:
    """The samples of one run: its sources' token shards concatenated, each with its feature row.

    A line of more than `budget` text tokens becomes several samples (`split_line`); `split_lines`
    counts such lines and `parts` the samples they became."""

    def __init__(self, sources: dict[str, TokenShards], features: FeatureTable, problems: ProblemLog,
                 budget: int | None = None):
        self.shards: list[TokenShards] = []
        self._parts: dict[int, _Part] = {}  # sample -> its span of a long line (rare: a dict, not arrays)
        self.split_lines = 0
        locals_, shard_of, rows, words = [], [], [], []
        total = 0
        for name, shards in sources.items():
            n = len(shards)
            local = np.arange(n)
            row = np.full(n, -1, dtype=np.int64)
            if name == "captions":
                row = features.rows(shards.image_ids())
                missing = row < 0
                for i in np.flatnonzero(missing)[:1000]:
                    problems.add(f"captions[{i}]", f"no feature: image {shards.image_ids()[i]!r} is not in the store")
                local, row = local[~missing], row[~missing]
            count = shards.words()[local].astype(np.int64)
            if budget is not None:
                local, row, count = self._split_long(name, shards, local, row, count, budget, total, problems)
            locals_.append(local)
            shard_of.append(np.full(len(local), len(self.shards)))
            rows.append(row)
            words.append(count)
            self.shards.append(shards)
            total += len(local)
        self.local = np.concatenate(locals_)
        self.shard_of = np.concatenate(shard_of)
        self.feature_row = np.concatenate(rows)
        self.words = np.concatenate(words).astype(np.int64)
        self.features = features

    def _split_long(self, name: str, shards: TokenShards, local: np.ndarray, row: np.ndarray, count: np.ndarray,
                    budget: int, before: int, problems: ProblemLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local, row, words) with each line of more than `budget` tokens repeated once per part."""
        long = np.flatnonzero(shards.lengths()[local] > budget)
        if not len(long):
            return local, row, count
        runs = {}
        for i in long:
            _, line_words, _, starts = shards[int(local[i])]
            runs[i] = split_line(starts, line_words, budget)
            for _, lo, hi in runs[i]:
                if hi - lo > budget and len(problems) < 1000:
                    problems.add(f"{name}[{int(local[i])}]", f"long word: {hi - lo} tokens, cut to model.max_length")
        repeat = np.ones(len(local), dtype=np.int64)
        repeat[long] = [len(runs[i]) for i in long]
        first = np.cumsum(repeat) - repeat  # where each line's first sample lands
        count = np.repeat(count, repeat)
        for i, parts in runs.items():
            for k, (n, lo, hi) in enumerate(parts):
                count[first[i] + k] = n
                self._parts[before + int(first[i]) + k] = _Part(lo, hi, k == len(parts) - 1)
        self.split_lines += len(long)
        return np.repeat(local, repeat), np.repeat(row, repeat), count

    @property
    def parts(self) -> int:
        """Samples that are parts of long lines."""
        return len(self._parts)

    def __len__(self) -> int:
        return len(self.words)

    def tokens(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """A sample's token ids, and which of them begin a word."""
        tokens, _, _, starts = self.shards[self.shard_of[sample]][int(self.local[sample])]
        part = self._parts.get(sample)
        return (tokens, starts) if part is None else (tokens[part.lo : part.hi], starts[part.lo : part.hi])

    def ends_line(self, sample: int) -> bool:
        """Whether the sample's last word ends its corpus line (EOS follows it)."""
        part = self._parts.get(sample)
        return part is None or part.last


def split_note(samples: Samples, max_length: int) -> str | None:
    """What to tell about the lines too long for `max_length` (None when there are none)."""
    split, parts = samples.split_lines, samples.parts
    if not split:
        return None
    lines = len(samples) - parts + split
    most = " (most lines: is model.max_length too small?)" if 2 * split > lines else ""
    return (f"{split} of {lines} corpus lines do not fit model.max_length {max_length}; they train as {parts} "
            f"shorter sequences, split between words{most}")


def piece_tokens(tokens: np.ndarray, piece: Piece, words: int, starts: np.ndarray) -> np.ndarray:
    """The tokens of words [piece.start, piece.stop) of a sample (`starts`: per token, whether it
    begins a word)."""
    if piece.start == 0 and piece.stop == words:
        return tokens
    at = _word_starts_at(starts, words)
    lo = at[piece.start]
    hi = at[piece.stop] if piece.stop < words else len(tokens)
    return tokens[lo:hi]


@dataclasses.dataclass(frozen=True)
class Collator:
    """Pieces -> model inputs: [BOS, <image> × tokens, text…, EOS] with the image's feature (or the
    null): `pixel_values` [B, D], or [B, G², D] from a grid store (one <image> token per cell)."""

    samples: Samples
    bos: int
    eos: int
    pad_id: int
    image_token: int
    max_length: int
    multimodal_flags: bool = False  # add `multimodal` [B] (has a real image) for the expert model's routing

    def sequence(self, piece: Piece) -> list[int]:
        words = int(self.samples.words[piece.sample])
        tokens, starts = self.samples.tokens(piece.sample)
        text = piece_tokens(tokens, piece, words, starts).tolist()
        end = [self.eos] if piece.stop == words and self.samples.ends_line(piece.sample) else []
        return ([self.bos] + [self.image_token] * self.samples.features.tokens + text + end)[: self.max_length]

    @property
    def prefix(self) -> int:
        """Positions before the text: BOS and the image tokens."""
        return 1 + self.samples.features.tokens

    def __call__(self, pieces: Sequence[Piece]) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self.samples.feature_row[[p.sample for p in pieces]])
        feats = self.samples.features.features[rows.clamp(min=0)].float()
        feats[rows < 0] = self.samples.features.null
        out = self.pad([self.sequence(p) for p in pieces], feats)
        if self.multimodal_flags:
            out["multimodal"] = rows >= 0
        return out

    def text_sequence(self, tokens: Sequence[int]) -> list[int]:
        """A text that is no corpus sample (a dev line) as a sequence: the null image before it."""
        return ([self.bos] + [self.image_token] * self.samples.features.tokens + list(tokens) + [self.eos])[: self.max_length]

    def pad(self, seqs: Sequence[Sequence[int]], feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sequences (each with its image feature) as one padded batch, the prefix left out of the labels."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : self.prefix] = -100  # BOS and the image tokens are context, not targets
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": feats}

    def tokens_in(self, pieces: Sequence[Piece]) -> int:
        """Target tokens the pieces hold (text + EOS), for tokens-seen accounting."""
        return sum(len(self.sequence(p)) - self.prefix for p in pieces)


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a run reads: its tokenizer, the feature store, its samples and their collator."""

    tokenizer: object
    features: FeatureTable
    samples: Samples
    collate: Collator


def run_data(cfg: Config, sources: Sequence[str], problems: ProblemLog, *, multimodal_flags: bool = False) -> RunData:
    """Load the tokenizer, the feature store and the token shards of `sources` (text, captions);
    `multimodal_flags`: batches say which samples carry an image (the expert model routes by it)."""
    tokenizer = load_tokenizer(cfg.layout.tokenizer_dir, cfg.tokenizer)
    features = FeatureTable(cfg.store_path)
    budget = cfg.model.max_length - 1 - features.tokens - 1  # text tokens between BOS + image tokens and EOS
    if budget < 1:
        raise VlmergeError(f"model.max_length: {cfg.model.max_length} leaves no room for text after BOS and the "
                           f"store's {features.tokens} image tokens per image, before EOS")
    samples = Samples({s: TokenShards(cfg.layout.corpus_source_dir(s)) for s in sources}, features, problems, budget)
    if not len(samples):
        raise VlmergeError(f"no training samples in {', '.join(sources)}")
    collate = Collator(
        samples, tokenizer.bos_token_id, tokenizer.eos_token_id,
        tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(tokenizer.image_token), cfg.model.max_length,
        multimodal_flags,
    )
    return RunData(tokenizer, features, samples, collate)
