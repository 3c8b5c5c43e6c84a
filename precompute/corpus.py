"""`vlmerge corpus`: text files and caption manifests -> memory-mappable token shards.

Each source (`text`, `captions`) becomes a folder of shards; shard k is these `.npy` files:
`tokens-k` (flat uint16/uint32 ids), `offsets-k` (int64, samples + 1), `words-k` (int32
whitespace words per sample, so that training counts words seen exactly), `starts-k` (bool per
token: it begins a whitespace word, so that a sample splits at a word boundary whatever the
tokenizer marks) and, for captions, `images-k` (the image id of each sample). `index.json` lists
the shards, the totals and each input file's samples and words ("files").

After the sources, `run` prints the split of every dataset, to hold against a paper's table (Takmaz et
al. 2025, Table 1): train samples (`data.text`, `data.captions`, counted while tokenising) beside
validation samples (`data.dev_text`, `data.dev_captions`, read and counted, never tokenised). A
training file and a validation file are one dataset when their names agree (`dataset_key`).
"""

from __future__ import annotations

import dataclasses
import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from vlmerge.precompute.manifests import expand_paths
from vlmerge.precompute.tokenizer import ENCODE_BATCH, batched, iter_captions, iter_text_lines, load_tokenizer
from vlmerge import layout
from vlmerge.config import Config, save_resolved
from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, check_writable, fingerprint, read_json, remove_stale_temps, write_json
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
    samples: Iterable[tuple[str | None, str]], tokenizer, out: Path, shard_samples: int, fp: str,
    files: list[dict] | None = None,
) -> dict:
    """Tokenise (image_id or None, text) samples into shards under `out`, atomically. `files`, the
    per-file counts that `samples` fills as it is read (`_counted`), goes into the index as they are."""
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
        if files is not None:
            index["files"] = files
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

    def lengths(self) -> np.ndarray:
        """Tokens of every sample."""
        return np.concatenate([np.diff(offsets) for _, offsets, _, _, _ in self._shards])

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


def _counted(
    source: str, paths: Sequence[Path], problems: ProblemLog, files: list[dict]
) -> Iterator[tuple[str | None, str]]:
    """(image_id or None, text) samples of `paths` (text files or caption manifests); `files` gets
    {"path", "samples", "words"} per file, counted as the samples are read."""
    for path in paths:
        entry = {"path": str(path), "samples": 0, "words": 0}
        files.append(entry)
        if source == "text":
            samples = ((None, line) for line in iter_text_lines([path], problems))
        else:
            samples = iter_captions([path], problems)
        for image_id, text in samples:
            entry["samples"] += 1
            entry["words"] += len(text.split())
            yield image_id, text


# A split word at the end of a file's stem, and the '_' or '-' before it.
_SPLIT_WORD = re.compile(r"(^|[_-])(train|dev|val|valid|validation|test)$", re.IGNORECASE)

# One row of the split table: dataset, train samples, val samples, train words (None: no such file).
SplitRow = tuple[str, int | None, int | None, int | None]


def dataset_key(path: str) -> str:
    """What pairs a training file with its validation file: the file name up to its first '.', less a
    trailing split word (train, dev, val, valid, validation, test) and the '_' or '-' before it. So
    bnc_spoken.train ~ bnc_spoken.dev, cc3m_train.jsonl ~ cc3m_val.jsonl, train.txt ~ dev.txt."""
    return _SPLIT_WORD.sub("", Path(path).name.split(".")[0]).lower()


def split_rows(source: str, train: list[dict] | None, val: list[dict], totals: dict | None = None) -> list[SplitRow]:
    """The split table's rows of one source from per-file counts ({"path", "samples", "words"}).

    A row per training file, labelled by its file name, with the first validation file of the same
    `dataset_key` beside it; a validation file left over gets its own row (no training side); more
    than one row, a "<source>, all files" row adds them up. `train` None (an index written before
    per-file counts): one "<source>, all files" row of `totals` ({"samples", "words"}) and all of `val`.
    """
    if train is None:
        val_samples = sum(v["samples"] for v in val) if val else None
        return [(f"{source}, all files", totals["samples"], val_samples, totals["words"])]
    left = list(val)
    rows: list[SplitRow] = []
    for t in train:
        v = next((v for v in left if dataset_key(v["path"]) == dataset_key(t["path"])), None)
        if v is not None:
            left.remove(v)
        rows.append((Path(t["path"]).name, t["samples"], v["samples"] if v else None, t["words"]))
    rows += [(Path(v["path"]).name, None, v["samples"], None) for v in left]
    if len(rows) > 1:
        rows.append((f"{source}, all files",
                     sum(t["samples"] for t in train) if train else None,
                     sum(v["samples"] for v in val) if val else None,
                     sum(t["words"] for t in train) if train else None))
    return rows


def format_split_table(rows: Sequence[SplitRow]) -> str:
    """The rows as a text table: thousands separators, '-' where a side is missing, the val share
    as val / (train + val) in percent."""
    def num(n: int | None) -> str:
        return "-" if n is None else f"{n:,}"

    body = [(name, num(t), num(v), "-" if t is None or v is None or t + v == 0 else f"{100 * v / (t + v):.1f}", num(w))
            for name, t, v, w in rows]
    header = ("dataset", "train sentences", "val sentences", "val share (%)", "train words")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()
                     for r in [header, *body])


def _print_splits(indexes: dict[str, dict], dev: dict[str, list[Path]]) -> None:
    """Count the validation files (read, not tokenised) and print the split table of every source."""
    rows: list[SplitRow] = []
    for source in SOURCES:
        index = indexes.get(source)
        if index is None and not dev[source]:
            continue
        problems, val = ProblemLog(), []
        for _ in _counted(source, dev[source], problems, val):
            pass
        problems.report(f"corpus dev_{source}")
        rows += split_rows(source, index.get("files") if index else [], val, index)
    if rows:
        print(format_split_table(rows))


def run(cfg: Config) -> Path:
    """Write the token shards of every configured source; sources already written are skipped."""
    out = cfg.layout.corpus_dir
    check_writable(cfg.root)
    remove_stale_temps(out)  # the temp folders of killed runs
    tok_dir = cfg.layout.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir, cfg.tokenizer)
    tok_fp = read_json(tok_dir / "stats.json")["fingerprint"]
    # The validation files, found before the long work: a missing one is an error now, not after it.
    dev = {s: expand_paths(getattr(cfg.data, f"dev_{s}"), f"data.dev_{s}") for s in SOURCES}
    indexes: dict[str, dict] = {}
    for source in SOURCES:
        files = cfg.data.text if source == "text" else cfg.data.captions
        if not files:
            continue
        fp = fingerprint([source, [cfg.layout.relative(f) for f in files], tok_fp, cfg.corpus.shard_samples, FORMAT])
        folder = cfg.layout.corpus_source_dir(source)
        if (folder / "index.json").is_file():
            if (index := read_json(folder / "index.json"))["fingerprint"] == fp:
                print(f"corpus: {folder} is up to date")
                indexes[source] = index
                continue
            if not layout.corpus_array(folder, "starts", 0).is_file():
                raise VlmergeError(f"{folder}: written by an older vlmerge (no word starts); remove it to rebuild")
            raise VlmergeError(f"{folder}: exists and was made from other inputs; remove it to rebuild")
        problems, counts = ProblemLog(), []
        samples = _counted(source, expand_paths(files, f"data.{source}"), problems, counts)
        index = indexes[source] = write_source(samples, tokenizer, folder, cfg.corpus.shard_samples, fp, counts)
        problems.report(f"corpus {source}")
        print(
            f"corpus: {folder}: {index['samples']} samples, {index['words']} words, {index['tokens']} tokens "
            f"in {len(index['shards'])} shard(s); {len(problems)} line(s) skipped"
        )
    _print_splits(indexes, dev)
    save_resolved(cfg, out / "config.yaml")
    return out
