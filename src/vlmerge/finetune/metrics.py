"""Classification metrics as BabyLM's fine-tuning computes them (scikit-learn's `accuracy_score`,
`f1_score` for label 1, `matthews_corrcoef`), including their value 0 where a denominator is 0; and
the vision-language metrics of Sung et al.'s downstream tasks: VQA accuracy and image–text retrieval recalls."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmerge.finetune.vl_data import normalize_answer


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(np.mean(labels == preds))


def f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """F1 of the positive class (label 1): 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    tp = int(np.sum((preds == 1) & (labels == 1)))
    fp = int(np.sum((preds == 1) & (labels != 1)))
    fn = int(np.sum((preds != 1) & (labels == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def mcc(labels: np.ndarray, preds: np.ndarray) -> float:
    """Matthews correlation over any number of classes (Gorodkin's R_K, as scikit-learn); 0 when undefined."""
    classes = np.union1d(labels, preds)
    t = np.array([np.sum(labels == c) for c in classes], dtype=np.float64)  # true counts per class
    p = np.array([np.sum(preds == c) for c in classes], dtype=np.float64)  # predicted counts per class
    correct, n = float(np.sum(labels == preds)), float(len(labels))
    denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - p @ t) / denominator) if denominator else 0.0


def soft_score(soft: np.ndarray, preds: np.ndarray) -> float:
    """The mean soft target of the predicted labels: VQA's accuracy, where a label's target is its
    answer's score min(1, 0.3 · its count among the humans' answers) (ViLT's `get_score`)."""
    # in float64, as the items' scores are averaged (their mean then reproduces it to the last digit)
    return float(np.mean(soft[np.arange(len(preds)), preds].astype(np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc}


RETRIEVAL = ("r_mean", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def pair_recalls(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Retrieval recalls of image-text matching scored on every pair: examples image-major ([images ×
    captions], label 1 where the caption is the image's), a pair's score its match logit margin."""
    n_captions = int(labels.sum())  # each caption matches one image
    grid = labels.reshape(-1, n_captions)
    return retrieval_recalls((logits[:, 1] - logits[:, 0]).reshape(grid.shape), grid.argmax(axis=0))


def classification_metrics(names: tuple[str, ...], labels: np.ndarray, preds: np.ndarray,
                           soft: np.ndarray | None = None, logits: np.ndarray | None = None) -> dict[str, float]:
    """The named metrics; `vqa_score` from the soft targets `[examples, labels]`, the retrieval recalls
    (RETRIEVAL) from the logits of every image-caption pair (`pair_recalls`)."""
    recalls = pair_recalls(labels, logits) if any(n in RETRIEVAL for n in names) else {}
    return {name: recalls[name] if name in RETRIEVAL else soft_score(soft, preds) if name == "vqa_score"
            else METRICS[name](labels, preds) for name in names}


def vqa_score(pred_answers: Sequence[str], answers: Sequence[tuple[str, ...]]) -> float:
    """VQA accuracy (vqaEval.py): per question, the mean over leaving out each human answer of min(1, matches / 3)."""
    if len(pred_answers) != len(answers):
        raise ValueError(f"{len(pred_answers)} predictions for {len(answers)} questions")
    per_question = []
    for i, (pred, humans) in enumerate(zip(pred_answers, answers)):
        if not humans:
            raise ValueError(f"question {i} has no human answers to score against")
        pred = normalize_answer(pred)  # the human answers come normalised (vl_data.read_vqa)
        n, m = len(humans), sum(h == pred for h in humans)
        # leaving out one of the m matching answers leaves m - 1 matches, leaving out one of the others m
        per_question.append((m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n)
    return float(np.mean(per_question))


def _ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each query's (row's) target's place in a stable sort by descending score: higher ones + earlier ties."""
    s = scores[np.arange(len(target)), target][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < target[:, None]
    return np.sum((scores > s) | ((scores == s) & earlier), axis=1)


def retrieval_recalls(scores: np.ndarray, caption_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of text retrieval ("tr_r<k>", image -> captions), image retrieval ("ir_r<k>"), their mean "r_mean".

    `scores` is [n_images, n_captions], `caption_image[c]` caption c's image. An image is a text-retrieval hit at k
    when one of its captions is among its k best; a caption an image-retrieval hit when its image is among its k
    best. Ties are ordered as a stable sort orders them, the earlier index first (ViLT's top-k, on distinct scores).
    """
    scores, caption_image = np.asarray(scores), np.asarray(caption_image)
    n_images, n_captions = scores.shape
    if caption_image.shape != (n_captions,) or n_captions and not (
            0 <= caption_image.min() and caption_image.max() < n_images):
        raise ValueError(f"caption_image must give each of the {n_captions} captions an image in [0, {n_images})")
    if not np.isfinite(scores).all():
        raise ValueError("retrieval scores must be finite")
    ir_rank = _ranks(scores.T, caption_image)
    is_caption = caption_image[None, :] == np.arange(n_images)[:, None]
    has_caption = is_caption.any(axis=1)  # an image without captions is never a hit
    # each image's first caption in that order: its best-scoring one, the earliest of ties (argmax's choice)
    best = np.argmax(np.where(is_caption, scores, -np.inf), axis=1)
    tr_rank = _ranks(scores, best)
    out = {f"tr_r{k}": float(np.mean(has_caption & (tr_rank < k))) for k in ks}
    out |= {f"ir_r{k}": float(np.mean(ir_rank < k)) for k in ks}
    out["r_mean"] = float(np.mean(list(out.values())))  # Sung et al.'s mean of the text and image recalls
    return out
