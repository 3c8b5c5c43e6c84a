"""Age of acquisition (BabyLM 2025's `AoA_word`, after Chang & Bergen 2022): when does a model learn a word?

Data (BabyLM 2025 `evaluation_data/full_eval/cdi_childes/cdi_childes.json`, read by
AoA_word/eval_util.py `load_eval`): a JSON object mapping each target word to a list of
`{"context": ...}` objects; words of one character are left out (as there). Children's side:
a CDI-format CSV (`evaluation_data/full_eval/aoa/cdi_human.csv`): a `word` column and one
column per age in months, "16" … "30", holding the share of children who produce the word.

Per model (the task `aoa`; AoA_word/evaluation_functions.py `StepSurprisalExtractor`,
`analyze_steps` with use_bos_only=False): the surprisal of the word after `context.strip() + " "`,
the completion-span rule of the other tasks, in nats; the metric is its mean ("surprisal"),
the per-item scores are the surprisals ("<word>/<context index>").

Over a checkpoint series (`aoa_fitness`; utils.py `AoAEvaluator.compute_curve_fitness`):
every (checkpoint, context) surprisal of a word is one point of the sigmoid
f(x) = a / (1 + exp(−b(x − c))) + d fitted (scipy's curve_fit) to −surprisal over
x = log10(words seen + 1); the model's AoA is the x where −surprisal crosses half way between
chance, log2(300,000), and the word's minimum surprisal (`compute_model_aoa`: the pipeline's
constants, including chance in bits against surprisal in nats); the child's AoA is the age
where the sigmoid fitted to the CDI proportions (bounded as there) crosses 0.5
(`compute_child_aoa`). Words without both, or whose crossing falls outside the data, are left
out; the metric is Pearson's r between the two AoAs ("pearson", n = words; 0.0 when fewer than
3 words, as there).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import curve_fit
from scipy.stats import pearsonr

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.readers import task_files
from vlmerge.evaluate.tasks import ItemScore, Metric, Request, Scores, Task, register
from vlmerge.problems import ProblemLog

CHANCE = float(np.log2(300_000))  # AoAEvaluator.compute_model_aoa's approximate_vocab, in bits
AGES = tuple(range(16, 31))  # the CDI columns the pipeline reads


@dataclasses.dataclass(frozen=True)
class AoaWord:
    word: str
    contexts: tuple[str, ...]


def load(path: Path, problems: ProblemLog) -> list[AoaWord]:
    """The target words (more than one character) and their contexts."""
    words = []
    for file in task_files(path, (".json",), "cdi_childes.json: {word: [{context}, …]}"):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VlmergeError(f"{file}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise VlmergeError(f"{file}: expected an object mapping words to lists of contexts")
        for word, rows in data.items():
            where = f"{file}:{word}"
            contexts = [r.get("context") for r in rows] if isinstance(rows, list) and \
                all(isinstance(r, dict) for r in rows) else None
            if contexts is None or not all(isinstance(c, str) for c in contexts):
                problems.add(where, "malformed entry: expected a list of {\"context\": string}")
            elif len(word) > 1:
                words.append(AoaWord(word, tuple(contexts)))
    return words


def requests(words: Sequence[AoaWord]) -> list[Request]:
    """The word after each of its contexts (stripped, then a space); one group per word."""
    return [Request(w.word.strip(), context=c.strip() + " ", group=k) for k, w in enumerate(words) for c in w.contexts]


def evaluate(words: Sequence[AoaWord], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """One model: the mean surprisal and each (word, context)'s."""
    ids = [f"{w.word}/{k}" for w in words for k in range(len(w.contexts))]
    surprisal = -scores.logprob
    return [Metric("", "surprisal", float(surprisal.mean()), len(ids))], \
        [ItemScore(i, "", float(s)) for i, s in zip(ids, surprisal)]


def sigmoid(x: np.ndarray, a: float, b: float, c: float, d: float) -> np.ndarray:
    return a / (1 + np.exp(-b * (x - c))) + d


def crossing(params: Sequence[float], y: float) -> float | None:
    """Where the fitted sigmoid reaches y; None when it never does (or is not increasing)."""
    a, b, c, d = params
    if b <= 0 or a <= 0 or not d < y < a + d:
        return None
    return float(c - np.log(a / (y - d) - 1) / b)


def child_aoa(proportions: np.ndarray, ages: np.ndarray = np.array(AGES)) -> float | None:
    """Age (months) at which the sigmoid fitted to the CDI proportions crosses 0.5."""
    ok = ~np.isnan(proportions)
    x, y = ages[ok], proportions[ok]
    if len(y) < 3:
        return None
    try:
        params, _ = curve_fit(sigmoid, x, y, p0=[1.0, 0.1, float(np.mean(x)), 0.0],
                              bounds=([0, 0, x[0], -0.5], [2.0, 1.0, x[-1], 0.5]), maxfev=1000)
    except (RuntimeError, ValueError, TypeError):  # no fit (too few points, no convergence): no AoA, as there
        return None
    aoa = crossing(params, 0.5)
    return aoa if aoa is not None and x[0] <= aoa <= x[-1] else None


def model_aoa(words_seen: np.ndarray, surprisal: np.ndarray) -> float | None:
    """log10(words seen + 1) at which −surprisal crosses half way from chance to its best."""
    ok = ~np.isnan(surprisal)
    steps, s = words_seen[ok], surprisal[ok]
    if len(surprisal) < 3 or not ok.any():
        return None
    threshold = CHANCE - 0.5 * (CHANCE - s.min())
    x, y = np.log10(steps + 1), -s
    try:
        params, _ = curve_fit(sigmoid, x, y, p0=[y.max() - y.min(), 1.0, x.mean(), y.min()], maxfev=1000)
    except (RuntimeError, ValueError, TypeError):  # no fit (too few points, no convergence): no AoA, as there
        return None
    log_step = crossing(params, -threshold)
    if log_step is None or not steps[0] <= 10**log_step - 1 <= steps[-1]:
        return None
    return log_step


def read_cdi(path: Path) -> dict[str, np.ndarray]:
    """word -> its proportions at ages 16…30 (NaN where absent), from a CDI-format CSV."""
    df = pd.read_csv(path)
    if "word" not in df.columns:
        raise VlmergeError(f"{path}: no 'word' column (expected word and ages 16 … 30)")
    ages = [str(a) for a in AGES if str(a) in df.columns]
    if not ages:
        raise VlmergeError(f"{path}: no age columns 16 … 30")
    if ages != [str(a) for a in AGES]:
        raise VlmergeError(f"{path}: expected every age column 16 … 30, found {', '.join(ages)}")
    table: dict[str, np.ndarray] = {}
    for word, row in zip(df["word"], df[ages].to_numpy(dtype=float)):
        table.setdefault(str(word), row)  # the pipeline takes a word's first row
    return table


def aoa_fitness(series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                cdi: Mapping[str, np.ndarray]) -> tuple[float, int]:
    """(Pearson r of model and child AoAs, words): `series` maps a word to its (words seen, surprisal) points."""
    model, child = [], []
    for word, (steps, surprisal) in series.items():
        if word not in cdi:
            continue
        c = child_aoa(cdi[word])
        m = None if c is None else model_aoa(np.asarray(steps, dtype=float), np.asarray(surprisal, dtype=float))
        if m is not None:
            model.append(m)
            child.append(c)
    if len(model) < 3:
        return 0.0, len(model)
    return float(pearsonr(model, child)[0]), len(model)


def series_of(per_checkpoint: Sequence[tuple[int, Sequence[tuple[str, float]]]]
              ) -> dict[str, tuple[list[int], list[float]]]:
    """word -> (words seen, surprisal) over every checkpoint and context, from `evaluate`'s per-item
    scores: (words seen, [(item id "<word>/<context index>", surprisal), …]) per checkpoint."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for seen, items in per_checkpoint:
        for item_id, value in items:
            steps, values = out.setdefault(item_id.rsplit("/", 1)[0], ([], []))
            steps.append(seen)
            values.append(value)
    return out


register(Task("aoa", load, requests, evaluate))
