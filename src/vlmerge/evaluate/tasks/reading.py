"""Reading (BabyLM 2025): does the model's word surprisal predict human reading times?

Format (BabyLM 2025 `evaluation_data/full_eval/reading/reading_data.csv`, read by the pipeline's
reading/run.py with `pd.read_csv(path, dtype={"item": str})`, a missing `item` read as the
string "None"): one row per word, with `item` (the text before the word), `word`, `prev_item` and
`prev_word` (the same for the word before; empty at a text's start), the eye-tracking measures
`RTfirstfix`, `RTfirstpass`, `RTgopast`, `RTrightbound`, `self_paced_reading_time` (empty where
not measured), and the predictors `Subtlex_log10` (frequency), `length`, `context_length` and
`prev_length`. A row without a word, or with a value that is not a number, is malformed.

Surprisal (reading/evaluation_functions.py `get_p2`), in nats: the word tokenised alone (no
special tokens); −log p of its first token after the tokenised `item`, then, for each next
subword, after `item` + the subwords before it decoded, tokenised again, of the first token of
that subword decoded and tokenised alone; summed (the Scorer's `by_subword` requests). Where the
tokenizer merges across that join ("the" + "m" → "them") or a subword is part of a UTF-8
character, this is not the log-probability of the word's own tokens: the pipeline's rule is the
score. The same for the previous word (`prev_pred`).

Metric (collate_preds.py `_calculate_reading_results`, reading/run.py): for each eye-tracking
measure, OLS of the measure on Subtlex_log10, length, context_length and their pairwise
interactions, with and without surprisal, each on its rows without missing values; the relative
gain in R², (R²_with − R²_without) / (1 − R²_without), ×100 ("r2_gain", subtask the measure);
"eye_tracking" (subtask "") is their mean over the four measures. Self-paced reading adds one
word of spill-over (prev_length and prev_pred, with all pairwise interactions) to both models
("self_paced_reading"). Regressions by statsmodels' formula API, as the pipeline's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.readers import task_files
from vlmerge.evaluate.tasks import ItemScore, Metric, Prediction, Request, Scores, Task, register
from vlmerge.problems import ProblemLog

EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
BASELINE = ("Subtlex_log10", "length", "context_length")
SPILLOVER = ("prev_length", "prev_pred")
NUMERIC = (*EYE_TRACKING, SELF_PACED, *BASELINE, "prev_length")
REQUIRED = ("item", "word", "prev_item", "prev_word", *NUMERIC)


@dataclasses.dataclass(frozen=True)
class Word:
    index: int  # the row's index in the file (the pipeline's prediction id)
    item: str
    word: str
    prev: tuple[str, str] | None  # (prev_item, prev_word), None at a text's start
    values: dict[str, float]  # NUMERIC columns, NaN where empty


def _number(value) -> float | None:
    """A cell as a float (NaN when empty); None when it is not a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        return None


def load(path: Path, problems: ProblemLog) -> list[Word]:
    """The words of reading_data.csv (or of a folder's .csv files)."""
    words = []
    for file in task_files(path, (".csv",), "BabyLM's reading_data.csv"):
        df = pd.read_csv(file, dtype=str, keep_default_na=False)
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise VlmergeError(f"{file}: no column {missing[0]!r} (expected {', '.join(REQUIRED)})")
        for index, row in enumerate(df.to_dict("records")):
            where = f"{file}:{index + 2}"  # line 1 is the header
            values = {c: _number(row[c]) for c in NUMERIC}
            bad = next((c for c, v in values.items() if v is None), None)
            if not row["word"]:
                problems.add(where, "malformed line: 'word' is empty")
            elif bad is not None:
                problems.add(where, f"malformed line: {bad!r} is not a number ({row[bad]!r})")
            else:
                prev = (row["prev_item"], row["prev_word"]) if row["prev_item"] else None
                words.append(Word(index, row["item"] or "None", row["word"], prev, values))
    return words


def requests(words: Sequence[Word]) -> list[Request]:
    """Each word after its item, then (if any) the previous word after its item; one group per row."""
    out = []
    for k, w in enumerate(words):
        out.append(Request(w.word, context=w.item, group=k, by_subword=True))
        if w.prev is not None:
            out.append(Request(w.prev[1], context=w.prev[0], group=k, by_subword=True))
    return out


def surprisals(words: Sequence[Word], scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """(pred, prev_pred): −Σ log p of each word and of its previous word (NaN without one)."""
    pred, prev, i = np.empty(len(words)), np.full(len(words), np.nan), 0
    for k, w in enumerate(words):
        pred[k], i = -scores.logprob[i], i + 1
        if w.prev is not None:
            prev[k], i = -scores.logprob[i], i + 1
    return pred, prev


def _formula(dv: str, predictors: Sequence[str], extra: str = "") -> str:
    pairs = [f"{a}:{b}" for i, a in enumerate(predictors) for b in predictors[i + 1 :]]
    return f"{dv} ~ " + " + ".join([*predictors, *pairs, *([extra] if extra else [])])


def r2_gain(data: pd.DataFrame, dv: str, predictors: Sequence[str]) -> float:
    """(R²_with − R²_without) / (1 − R²_without) of adding `pred` to the OLS of `dv` on the predictors."""
    base = smf.ols(_formula(dv, predictors), data=data[[dv, *predictors]].dropna()).fit().rsquared
    full = smf.ols(_formula(dv, predictors, "pred"), data=data[[dv, *predictors, "pred"]].dropna()).fit().rsquared
    return float((full - base) / (1 - base))


def evaluate(words: Sequence[Word], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Relative R² gains ×100: per eye-tracking measure, their mean, and self-paced reading with spill-over."""
    pred, prev = surprisals(words, scores)
    data = pd.DataFrame([w.values for w in words]).assign(pred=pred, prev_pred=prev)
    gains = {dv: 100 * r2_gain(data, dv, BASELINE) for dv in EYE_TRACKING}
    n = len(words)
    metrics = [Metric(dv, "r2_gain", g, int(data[dv].notna().sum())) for dv, g in gains.items()]
    metrics += [Metric("", "eye_tracking", float(np.mean(list(gains.values()))), n),
                Metric("", "self_paced_reading", 100 * r2_gain(data, SELF_PACED, (*BASELINE, *SPILLOVER)), n)]
    return metrics, [ItemScore(str(w.index), "", float(s)) for w, s in zip(words, pred)]


def predict(words: Sequence[Word], scores: Scores) -> list[Prediction]:
    """reading/run.py's predictions.json rows: {"id": row index, "pred", "prev_pred"} (NaN without a previous word)."""
    pred, prev = surprisals(words, scores)
    return [Prediction("reading", float(p), fields={"id": w.index, "pred": float(p), "prev_pred": float(q)})
            for w, p, q in zip(words, pred, prev)]


register(Task("reading", load, requests, evaluate, predict=predict, babylm="reading"))
