"""The wug tests of BabyLM 2025: `wug_adj` (adjective nominalisation) and `wug_past` (past tense).

Format (BabyLM 2025 `evaluation_data/full_eval/wug_adj_nominalization/` and
`wug_past_tense/`; read by sentence_zero_shot/read_files.py `decode_wug`): one JSON object per
line with `sentences` (the candidate sentences, tab-separated; the first is the form the human
ratio is about) and `ratio` (the share of people who chose that form; a number or a numeric
string).

Scoring (compute_results.py `rank_and_evaluate_wug`, run.py `process_results_wug`): each
candidate sentence is scored whole; the model's probability of the first candidate is the
softmax over the candidates' summed log-probabilities; the metric is Spearman's ρ between
those probabilities and the human ratios over all items of the task ("spearman", subtask "").
Per-item scores are the model's probabilities (ρ is not a mean of them, so they carry no
bootstrap interval of ρ by themselves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import softmax
from scipy.stats import spearmanr

from vlmerge.evaluate.readers import read_records, strings
from vlmerge.evaluate.tasks import ItemScore, Metric, Prediction, Request, Scores, Task, choice_predictions, register
from vlmerge.problems import ProblemLog

EXPECTED = "wug JSONL with tab-separated 'sentences' (the rated form first) and 'ratio'"


@dataclasses.dataclass(frozen=True)
class WugItem:
    item_id: str  # "<task>_<n>", the pipeline's prediction id
    sentences: tuple[str, ...]
    ratio: float


def _ratio(value) -> float | None:
    """The human ratio as a finite float (the pipeline calls float() on it), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        ratio = float(value)
    except ValueError:
        return None
    return ratio if math.isfinite(ratio) else None


def loader(task: str):
    def load(path: Path, problems: ProblemLog) -> list[WugItem]:
        """The items of a JSONL file or a folder of them."""
        items = []
        for _, where, obj in read_records(path, problems, EXPECTED):
            values = strings(obj, ("sentences",), where, problems)
            if values is None:
                continue
            sentences, ratio = tuple(values[0].split("\t")), _ratio(obj.get("ratio"))
            if len(sentences) < 2 or not all(sentences):
                problems.add(where, "malformed line: 'sentences' must hold at least two non-empty tab-separated sentences")
            elif ratio is None:
                problems.add(where, "malformed line: 'ratio' must be a finite number")
            else:
                items.append(WugItem(f"{task}_{len(items)}", sentences, ratio))
        return items
    return load


def requests(items: Sequence[WugItem]) -> list[Request]:
    """Every candidate sentence whole, one group per item."""
    return [Request(s, group=k) for k, it in enumerate(items) for s in it.sentences]


def first_probability(logprob: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Per item: the softmax over its candidates' scores, at its first candidate."""
    starts = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
    return np.array([softmax(logprob[a : a + n])[0] for a, n in zip(starts, sizes)])


def evaluate(items: Sequence[WugItem], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Spearman's ρ between the model's and the humans' ratios, over all items."""
    p = first_probability(scores.logprob, [len(it.sentences) for it in items])
    rho = float(spearmanr(p, [it.ratio for it in items])[0])
    return [Metric("", "spearman", rho, len(items))], [ItemScore(it.item_id, "", float(x)) for it, x in zip(items, p)]


def predictor(task: str):
    def predict(items: Sequence[WugItem], scores: Scores) -> list[Prediction]:
        """The chosen sentence and the first candidate's probability (the pipeline's "prob")."""
        picks = choice_predictions([task] * len(items), [it.sentences for it in items], scores)
        p = first_probability(scores.logprob, [len(it.sentences) for it in items])
        return [dataclasses.replace(pick, prob=float(x)) for pick, x in zip(picks, p)]
    return predict


for _name in ("wug_adj", "wug_past"):
    register(Task(_name, loader(_name), requests, evaluate, predict=predictor(_name), babylm=_name))
