"""`vlmerge tokenizer`: a BPE tokenizer trained on the experiment's text sources, by one of two recipes
(`tokenizer.recipe`):

- `bytelevel`: byte-level BPE as GPT-2: every byte is a symbol (no unknown token), a word-initial
  token carries its space ('Ġ'), a prefix space makes a sentence's first word like any other;
- `llava_bpe`: Takmaz et al.'s (BabyLM 2025, §4 and fn. 7): BPE over a BERT pre-tokenizer (words
  split at whitespace and punctuation, the spaces dropped), an unknown token for a character never
  seen in training, 30,000 tokens with the image token in their config.

Neither recipe's markers matter downstream: the corpus stores which tokens begin a word from the
character offsets (`vlmerge.precompute.corpus.word_starts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmerge.precompute.manifests import expand_paths
from vlmerge.config import Config, TokenizerConfig, save_resolved
from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, check_writable, fingerprint, read_json, remove_stale_temps, write_json
from vlmerge.problems import ProblemLog, read_jsonl

ENCODE_BATCH = 10_000  # lines per call into the (parallel, Rust) batch encoder


def normalize(text: str) -> str:
    """Words separated by single spaces: a word boundary is one space, whatever the tokenizer."""
    return " ".join(text.split())


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8
_NUL = "malformed line: holds a NUL byte"


def iter_text_lines(paths: Iterable[Path], problems: ProblemLog) -> Iterator[str]:
    """Non-empty lines of BabyLM-style text files (one utterance per line), normalised. A line that is
    not UTF-8 or holds a NUL byte (a binary file, a broken download) is a problem, left out."""
    for path in paths:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                if _UNDECODABLE.search(line):
                    problems.add(f"{path}:{lineno}", "malformed line: not UTF-8")
                elif "\0" in line:
                    problems.add(f"{path}:{lineno}", _NUL)
                elif line := normalize(line):
                    yield line


def iter_captions(paths: Iterable[Path], problems: ProblemLog) -> Iterator[tuple[str, str]]:
    """(image_id, caption) of caption manifests; lines without both, or with a NUL in them, are problems."""
    for path in paths:
        for where, obj in read_jsonl(path, problems, "manifest"):
            image_id, caption = obj.get("image_id"), obj.get("caption")
            if not isinstance(image_id, str) or not isinstance(caption, str) or not caption.strip():
                problems.add(where, "malformed line: expected string 'image_id' and non-empty 'caption'")
                continue
            if "\0" in image_id + caption:  # ("\u0000" in the JSON)
                problems.add(where, _NUL)
                continue
            yield image_id, normalize(caption)


def training_text(cfg: Config, problems: ProblemLog) -> Iterator[str]:
    """Every line of text the models train on: text files, then captions."""
    yield from iter_text_lines(expand_paths(cfg.data.text, "data.text"), problems)
    yield from (c for _, c in iter_captions(expand_paths(cfg.data.captions, "data.captions"), problems))


def special_tokens(tc: TokenizerConfig) -> list[str]:
    return [tc.pad_token, tc.bos_token, tc.eos_token, tc.image_token] + ([tc.unk_token] if tc.recipe == "llava_bpe" else [])


def train_bpe(lines: Iterable[str], tc: TokenizerConfig, *, progress: bool = True) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of `tc.recipe` (see the module's docstring) trained on `lines`."""
    if tc.recipe == "bytelevel":
        tok = Tokenizer(models.BPE())
        # A prefix space makes a sentence's first word the same token as anywhere else.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=tc.unk_token))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=tc.vocab_size,
        min_frequency=tc.min_frequency,
        special_tokens=special_tokens(tc),
        initial_alphabet=alphabet,
        show_progress=progress,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tc.bos_token,
        eos_token=tc.eos_token,
        pad_token=tc.pad_token,
        **({"unk_token": tc.unk_token} if tc.recipe == "llava_bpe" else {}),
        extra_special_tokens={"image_token": tc.image_token},
    )


def batched(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def subword_ratio(tokenizer: PreTrainedTokenizerFast, lines: Iterable[str]) -> tuple[float, int, int]:
    """(subword tokens per whitespace word, tokens, words) over `lines`."""
    tokens = words = 0
    for batch in batched(lines, ENCODE_BATCH):
        tokens += sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False))
        words += sum(len(line.split()) for line in batch)
    return (tokens / words if words else 0.0), tokens, words


def load_tokenizer(path: Path, tc: TokenizerConfig) -> PreTrainedTokenizerFast:
    """A saved tokenizer, checked to have the special tokens the model needs."""
    if not (path / "tokenizer.json").is_file():
        raise VlmergeError(f"{path}: no tokenizer here; run `vlmerge tokenizer` first")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = tok.get_vocab()
    for t in special_tokens(tc):
        if t not in vocab:
            raise VlmergeError(f"{path}: tokenizer has no {t!r} token (needs {', '.join(special_tokens(tc))})")
    return tok


def run(cfg: Config, *, progress: bool = True) -> Path:
    """Train and save the tokenizer with its stats; skip if an identical one is already saved."""
    out = cfg.layout.tokenizer_dir
    check_writable(cfg.root)
    remove_stale_temps(out.parent)  # the temp folders of killed runs
    rel = cfg.layout.relative
    fp = fingerprint([cfg.tokenizer.identity(), [rel(p) for p in cfg.data.text], [rel(p) for p in cfg.data.captions]])
    if (out / "stats.json").is_file():
        if read_json(out / "stats.json").get("fingerprint") == fp:
            print(f"tokenizer: {out} is up to date")
            return out
        raise VlmergeError(f"{out}: exists and was trained on other settings; remove it to train again")
    problems = ProblemLog()
    tok = train_bpe(training_text(cfg, problems), cfg.tokenizer, progress=progress)
    problems.report("tokenizer inputs")
    ratio, tokens, words = subword_ratio(tok, training_text(cfg, ProblemLog()))
    stats = {
        "fingerprint": fp,
        "vocab_size": len(tok),
        "words": words,
        "tokens": tokens,
        "subword_tokens_per_word": round(ratio, 4),
        "skipped_lines": len(problems),
    }
    with atomic_path(out, is_dir=True) as tmp:
        tok.save_pretrained(tmp)
        write_json(tmp / "stats.json", stats)
        save_resolved(cfg, tmp / "config.yaml")
    print(f"tokenizer: {out}: vocab {len(tok)}, {ratio:.3f} subword tokens per word ({tokens} / {words})")
    return out
