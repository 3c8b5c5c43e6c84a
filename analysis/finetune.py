"""The fine-tuning table: per (Super)GLUE task, the twins beside the merges fine-tuned with them
(`sweep.finetune`, `vlmerge finetune`), each metric as reported and accuracy's 95% bootstrap
interval over the valid items; and its findings: each fine-tuned model's accuracy against the
text twin's on the same valid items (a paired bootstrap: the same resampled items for both).

Fine-tuning rows (task `glue/<name>`, `ft_<name>`) are not scores of the merge sweep: the other analyses
leave them out (`without_finetune`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from vlmerge.analysis.findings import Finding, excludes, gap_sentence, setting_name
from vlmerge.analysis.load import MODEL, NO_WORDS, Results
from vlmerge.analysis.stats import percentile_interval
from vlmerge.results import UNMERGED

FAMILIES = ("glue/", "ft_")  # the task columns of fine-tuning rows: glue/<task>, ft_vqa, ft_nlvr2, …
METRICS = ("accuracy", "f1", "mcc")


def _is_finetune(frame: pd.DataFrame) -> pd.Series:
    return frame.task.astype(str).str.startswith(FAMILIES)


def without_finetune(results: Results) -> Results:
    return dataclasses.replace(results, metrics=results.metrics[~_is_finetune(results.metrics)],
                               items=results.items[~_is_finetune(results.items)])


def model_label(row: pd.Series) -> str:
    if row.method == UNMERGED:
        return "text twin" if row.text_run else "multimodal twin"
    return f"{setting_name(row.method, row.method_params)} α={row.alpha:g}"


def accuracy_interval(correct: np.ndarray, replicates: int, rng: np.random.Generator) -> tuple[float, float]:
    """The 95% percentile interval of the accuracy, the valid items resampled with replacement."""
    if replicates == 0 or correct.size == 0:
        return float("nan"), float("nan")
    draws = rng.integers(0, correct.size, size=(replicates, correct.size))
    return percentile_interval(correct[draws].mean(axis=1))


def finetune_table(results: Results, replicates: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per task and model: its words seen, the metrics, accuracy's interval; twins first."""
    metrics = results.metrics[_is_finetune(results.metrics)]
    items = results.items[_is_finetune(results.items)]
    rows = []
    for (task, *key), group in metrics.groupby(["task", *MODEL], sort=True, dropna=False):
        model = pd.Series(dict(zip(MODEL, key)))
        values = group.set_index("metric").value
        mine = items[(items.task == task) & (items[MODEL] == model[MODEL]).all(axis=1)]
        low, high = accuracy_interval(mine.value.to_numpy(), replicates, rng)
        words = model.mm_words if model.mm_words != NO_WORDS else model.text_words
        rows.append({"task": task.removeprefix("glue/"), "model": model_label(model), "words": int(words),
                     **{m: values.get(m, np.nan) for m in METRICS}, "accuracy_low": low, "accuracy_high": high,
                     "n": int(group.n.iloc[0]), "_twin": model.method != UNMERGED, "_alpha": model.alpha})
    table = pd.DataFrame(rows, columns=["task", "model", "words", *METRICS, "accuracy_low", "accuracy_high", "n",
                                        "_twin", "_alpha"])
    return table.sort_values(["task", "words", "_twin", "model"]).drop(columns=["_twin", "_alpha"]).reset_index(drop=True)


def _correct(items: pd.DataFrame, task: str, model: pd.Series) -> pd.Series:
    """A model's per-item right (1) or wrong (0) on a task, by example id."""
    mine = items[(items.task == task) & (items[MODEL] == model[MODEL]).all(axis=1)]
    return mine.set_index("example_id").value


def finetune_findings(results: Results, replicates: int, rng: np.random.Generator) -> list[Finding]:
    """Per fine-tuning task and checkpoint pair: every other fine-tuned model's accuracy minus the
    text twin's, with a paired 95% bootstrap interval over the valid items."""
    metrics = results.metrics[_is_finetune(results.metrics) & (results.metrics.metric == "accuracy")]
    items = results.items[_is_finetune(results.items)]
    out = []
    for task, rows in metrics.groupby("task", sort=True):
        models = rows[MODEL].drop_duplicates()
        text = models[(models.method == UNMERGED) & (models.text_run != "")]
        for _, twin in text.iterrows():
            words = int(twin.text_words)
            mates = models[(models.mm_words == words) & ~((models.method == UNMERGED) & (models.text_run != ""))]
            base = _correct(items, task, twin)
            for _, other in mates.iterrows():
                theirs = _correct(items, task, other).reindex(base.index)
                if base.empty or theirs.isna().any():
                    continue
                diff = theirs.to_numpy() - base.to_numpy()
                draws = rng.integers(0, diff.size, size=(replicates, diff.size)) if replicates else None
                value = float(diff.mean())
                low, high = percentile_interval(diff[draws].mean(axis=1)) if draws is not None else (np.nan, np.nan)
                name = model_label(other)
                subject = f"The {name}" if other.method == UNMERGED else f"The merge {name}"
                where = f"after fine-tuning on {task.removeprefix('glue/')} at {words:,} words"
                sentence = gap_sentence(value, low, high,
                                        none=f"{subject} and the text twin do not differ in accuracy {where}: "
                                             f"{name} − text twin",
                                        above=f"{subject} is above the text twin in accuracy {where}",
                                        below=f"{subject} is below the text twin in accuracy {where}")
                out.append(Finding("finetune", task, sentence, value, low, high, 0.0, diff.size,
                                   excludes(low, high, 0.0), {"model": name, "words": words}))
    return out
