"""`vlmerge corpus`: text files and caption manifests -> memory-mappable token shards.

Each source (`text`, `captions`) becomes a folder of shards; shard k is these `.npy` files:
`tokens-k` (flat uint16/uint32 ids), `offsets-k` (int64, samples + 1), `words-k` (int32
whitespace words per sample, so that training counts words seen exactly), `starts-k` (bool per
token: it begins a whitespace word, so that a sample splits at a word boundary whatever the
tokenizer marks) and, for captions, `images-k` (the image id of each sample). `index.json` lists
the shards and totals.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from vlmerge.precompute.manifests import expand_paths
from vlmerge.precompute.tokenizer import ENCODE_BATCH, batched, iter_captions, iter_text_lines, load_tokenizer
from vlmerge import layout
from vlmerge.config import Config, save_resolved
from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, check_writable, fingerprint, read_json, write_json
from vlmerge.problems import ProblemLog

SOURCES = ("text", "captions")
# The shards' layout: a corpus written before word starts were stored is rebuilt, not misread.
FORMAT = 2


def word_starts(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token of `text` (words separated by single spaces), whether it begins a word: for each word,
    the first token that holds its first character or the space before it (a byte-level BPE token
    carries that space, 'Ġ'; a whitespace pre-tokenizer's tokens do not). From the character
    offsets alone, so for any tokenizer."""
    flags = np.zeros(len(offsets), dtype=bool)
    ends = [end for _, end in offsets]  # non-decreasing: tokens come in order
    for p in (0, *(i + 1 for i, c in enumerate(text) if c == " ")):
        t = bisect_right(ends, max(p - 1, 0))  # the first token ending after the space before the word
        if t < len(offsets) and offsets[t][0] <= p:
            flags[t] = True
    return flags


@dataclasses.dataclass
class _ShardBuffer:
    """Samples collected for one shard before it is written."""

    tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
    words: list[int] = dataclasses.field(default_factory=list)
    starts: list[np.ndarray] = dataclasses.field(default_factory=list)
    images: list[str] = dataclasses.field(default_factory=list)

    def write(self, folder: Path, k: int, dtype: np.dtype) -> dict:
        lengths = np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(self.tokens).astype(dtype) if self.tokens else np.zeros(0, dtype)
        np.save(layout.corpus_array(folder, "tokens", k), flat)
        np.save(layout.corpus_array(folder, "offsets", k), offsets)
        np.save(layout.corpus_array(folder, "words", k), np.array(self.words, dtype=np.int32))
        np.save(layout.corpus_array(folder, "starts", k),
                np.concatenate(self.starts) if self.starts else np.zeros(0, dtype=bool))
        if self.images:
            np.save(layout.corpus_array(folder, "images", k), np.array(self.images, dtype=str))
        return {"shard": k, "samples": len(self.words), "tokens": int(offsets[-1]), "words": int(sum(self.words))}


def write_source(
    samples: Iterable[tuple[str | None, str]], tokenizer, out: Path, shard_samples: int, fp: str
) -> dict:
    """Tokenise (image_id or None, text) samples into shards under `out`, atomically."""
    dtype = np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32)
    shards: list[dict] = []
    with atomic_path(out, is_dir=True) as tmp:
        buf = _ShardBuffer()
        for batch in batched(samples, ENCODE_BATCH):
            encoded = tokenizer.backend_tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (image_id, text), enc in zip(batch, encoded, strict=True):
                buf.tokens.append(np.asarray(enc.ids, dtype=np.int64))
                buf.words.append(len(text.split()))
                buf.starts.append(word_starts(text, enc.offsets))
                if image_id is not None:
                    buf.images.append(image_id)
                if len(buf.words) == shard_samples:
                    shards.append(buf.write(tmp, len(shards), dtype))
                    buf = _ShardBuffer()
        if buf.words or not shards:
            shards.append(buf.write(tmp, len(shards), dtype))
        index = {
            "fingerprint": fp,
            "dtype": dtype.name,
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "words": sum(s["words"] for s in shards),
            "shards": shards,
        }
        write_json(tmp / "index.json", index)
    return index


class TokenShards:
    """Read side: memory-maps every shard of one source; sample i -> (token ids, words, image id)."""

    def __init__(self, folder: Path):
        if not (folder / "index.json").is_file():
            raise VlmergeError(f"{folder}: no token shards here; run `vlmerge corpus` first")
        self.index = read_json(folder / "index.json")
        self._shards = []
        for s in self.index["shards"]:
            k = s["shard"]
            images = layout.corpus_array(folder, "images", k)
            self._shards.append((
                np.load(layout.corpus_array(folder, "tokens", k), mmap_mode="r"),
                np.load(layout.corpus_array(folder, "offsets", k), mmap_mode="r"),
                np.load(layout.corpus_array(folder, "words", k), mmap_mode="r"),
                np.load(images, mmap_mode="r") if images.exists() else None,
                np.load(layout.corpus_array(folder, "starts", k), mmap_mode="r"),
            ))
        self._starts = np.cumsum([0] + [s["samples"] for s in self.index["shards"]])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def words(self) -> np.ndarray:
        """Whitespace words of every sample."""
        return np.concatenate([words for _, _, words, _, _ in self._shards])

    def image_ids(self) -> np.ndarray:
        """The image id of every sample (caption sources only)."""
        if any(images is None for _, _, _, images, _ in self._shards):
            raise VlmergeError("these token shards are not captions: they have no image ids")
        return np.concatenate([images for _, _, _, images, _ in self._shards])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, str | None, np.ndarray]:
        """(token ids, words, image id or None, which tokens begin a word) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        tokens, offsets, words, images, starts = self._shards[k]
        j = i - int(self._starts[k])
        span = slice(offsets[j], offsets[j + 1])
        return tokens[span], int(words[j]), (str(images[j]) if images is not None else None), starts[span]


def _source_samples(cfg: Config, source: str, problems: ProblemLog) -> Iterator[tuple[str | None, str]]:
    if source == "text":
        return ((None, line) for line in iter_text_lines(expand_paths(cfg.data.text, "data.text")))
    return iter_captions(expand_paths(cfg.data.captions, "data.captions"), problems)


def run(cfg: Config) -> Path:
    """Write the token shards of every configured source; sources already written are skipped."""
    out = cfg.layout.corpus_dir
    check_writable(cfg.root)
    tok_dir = cfg.layout.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir, cfg.tokenizer)
    tok_fp = read_json(tok_dir / "stats.json")["fingerprint"]
    for source in SOURCES:
        files = cfg.data.text if source == "text" else cfg.data.captions
        if not files:
            continue
        fp = fingerprint([source, files, tok_fp, cfg.corpus.shard_samples, FORMAT])
        folder = cfg.layout.corpus_source_dir(source)
        if (folder / "index.json").is_file():
            if read_json(folder / "index.json")["fingerprint"] == fp:
                print(f"corpus: {folder} is up to date")
                continue
            if not layout.corpus_array(folder, "starts", 0).is_file():
                raise VlmergeError(f"{folder}: written by an older vlmerge (no word starts); remove it to rebuild")
            raise VlmergeError(f"{folder}: exists and was made from other inputs; remove it to rebuild")
        problems = ProblemLog()
        index = write_source(_source_samples(cfg, source, problems), tokenizer, folder, cfg.corpus.shard_samples, fp)
        problems.report(f"corpus {source}")
        print(
            f"corpus: {folder}: {index['samples']} samples, {index['words']} words, {index['tokens']} tokens "
            f"in {len(index['shards'])} shard(s); {len(problems)} line(s) skipped"
        )
    save_resolved(cfg, out / "config.yaml")
    return out
