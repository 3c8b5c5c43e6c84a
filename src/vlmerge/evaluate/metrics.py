"""Pure metrics over scores: choice accuracy, per-subtask and macro means, Winoground, perplexity.

Nothing here knows a task, a file or a model: the task modules call these on the scorer's
log-probabilities, and the tests call them on scores they choose. A choice is correct when
the right candidate scores at least as high as every other: BabyLM 2025 takes the arg-max
over the candidates with the correct one first (sentence_zero_shot/compute_results.py
`rank_and_evaluate`, `torch.max`, which returns the first maximum), so a tie counts as correct.
Winoground's text/image/group scores are Thrush et al.'s, strict as theirs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np


def chosen(logprob: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Per item (consecutive runs of `sizes`): the index of its first best-scoring candidate (`torch.max`'s)."""
    starts = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
    return np.array([int(np.argmax(logprob[a : a + n])) for a, n in zip(starts, sizes)], dtype=np.int64)


def first_is_best(logprob: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Per item: is its first candidate the (first) arg-max? Items are consecutive runs of `sizes`; a tie counts."""
    return chosen(logprob, sizes) == 0


def accuracy_by(keys: Sequence[str], correct: Sequence[bool]) -> dict[str, tuple[float, int]]:
    """(accuracy, count) per key, e.g. per subtask; keys in sorted order."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for key, ok in zip(keys, correct, strict=True):
        hits[key].append(bool(ok))
    return {k: (sum(hits[k]) / len(hits[k]), len(hits[k])) for k in sorted(hits)}


def macro_mean(per_key: Mapping[str, tuple[float, int]]) -> tuple[float, int]:
    """The unweighted mean of per-key accuracies (BabyLM's average over subtasks) and the total count."""
    return float(np.mean([acc for acc, _ in per_key.values()])), sum(n for _, n in per_key.values())


def winoground_scores(s: np.ndarray) -> dict[str, np.ndarray]:
    """Per-item text, image and group correctness (Thrush et al. 2022); s[n, c, i] scores caption c with image i."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text_score": text, "image_score": image, "group_score": text & image}


def unpaired_correct(s: np.ndarray, item: np.ndarray, image: np.ndarray) -> np.ndarray:
    """BabyLM's unpaired Winoground comparisons: does image[j] of item[j] score its own caption above the other?

    BabyLM 2025 (github.com/babylm/evaluation-pipeline-2025) splits each Winoground item into
    one line per image (`image_idx`, `image_key`, `caption_0` = that image's caption,
    `caption_1` = the other item caption, label 0; 746 lines, `WINOGROUND_SIZE` in
    evaluation_pipeline/collate_preds.py) and scores a line correct iff its own caption gets
    the higher log-probability given the image, a tie counting as correct (sentence_zero_shot/
    read_files.py `decode_winoground`, compute_results.py `rank_and_evaluate`); docs/evaluation.md
    calls this the "unpaired text score". So: the mean of s(c_own, i) > s(c_other, i) over the per-image
    comparisons, 2N for N full items.
    """
    return s[item, image, image] >= s[item, 1 - image, image]


def logprob_per_token(logprob: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted mean log-probability: Σ logprob / Σ tokens."""
    return float(np.sum(logprob) / np.sum(tokens))


def perplexity(logprob: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted perplexity: exp(−Σ logprob / Σ tokens)."""
    return float(np.exp(-logprob_per_token(logprob, tokens)))
