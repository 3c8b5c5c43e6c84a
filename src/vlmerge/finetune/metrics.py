"""Classification metrics as BabyLM's fine-tuning computes them (scikit-learn's `accuracy_score`,
`f1_score` for label 1, `matthews_corrcoef`), including their value 0 where a denominator is 0."""

from __future__ import annotations

import numpy as np


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


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc}


def classification_metrics(names: tuple[str, ...], labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    return {name: METRICS[name](labels, preds) for name in names}
