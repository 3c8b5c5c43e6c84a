"""Takmaz et al. (BabyLM 2025)'s views of an experiment, and the numbers the paper states beside ours.

- Fig. 3: full BLiMP against words seen, both twins: the twins' checkpoints on the best-text data
  (results/<exp>/best_text.json of pairing best_text, the full BLiMP in the paper's config); without
  it, the twins' scores on the sweep's BLiMP, which the view says;
- Fig. 10: BLiMP (the sweep's, the fast set in the paper's config) of the linear merges with the best
  text checkpoint, one curve per α of the paper's (0.3, 0.5, 0.8) over the multimodal checkpoints,
  beside the unmerged multimodal twin; without best-text scores, the pairs at equal words;
- Fig. 11: Winoground (the full set's unpaired text score, `winoground_full`, else BabyLM's filtered
  set) of the multimodal twin and of its α = 0.3 merge per checkpoint, with the chance line.

The paper has plots only: REFERENCE holds the numbers it states in its text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from vlmerge.analysis import plots
from vlmerge.analysis.load import Results
from vlmerge.analysis.report import Section, fmt_number, markdown_table
from vlmerge.analysis.scores import chance

TITLE = "Takmaz et al. 2025: the paper's views"  # the report's section
PAPER_ALPHAS = (0.3, 0.5, 0.8)  # fn. 8 (and α = 0, the multimodal model)
FIG11_ALPHA = 0.3
BLIMP = "blimp"
WINOGROUND = ("winoground_full", "winoground")  # the paper's full set first
METHOD = "linear"  # §6: weighted linear interpolation
MM_TWIN = "multimodal twin"
FULL_DATA = "the best-text data"  # Fig. 3 on sweep.best_text_data, the full BLiMP in the paper's config
WORDS = "words seen"
# (what, the paper's value, in percent) as its text states them (§6, Fig. 3; the BabyLM 2025 baselines)
REFERENCE = [
    ("full BLiMP, best text-only checkpoint", "74.82 (at 100M words)"),
    ("full BLiMP, best multimodal checkpoint", "73.84"),
    ("BLiMP, BabyLM 2025 baselines", "Flamingo 70.9, GIT 72.2"),
    ("Winoground, BabyLM 2025 baselines", "Flamingo 54.8, GIT 56.2"),
    ("Winoground, multimodal twin and α = 0.3 merge (Fig. 11)", "46–54 (near chance, 50)"),
]
NOT_DRAWN = {"Fig. 3": f"no {BLIMP} scores of the twins",
             "Fig. 10": f"no linear merge at α {', '.join(map(str, PAPER_ALPHAS))} scored on {BLIMP}",
             "Fig. 11": f"no linear merge at α = {FIG11_ALPHA:g} scored on Winoground"}
DIRECTIONS = {"blimp": "text-only ahead", "blimp_supplement": "text-only ahead", "wug_adj": "text-only ahead",
              "wug_past": "text-only ahead", "entity_tracking": "multimodal ahead", "ewok": "multimodal ahead"}


@dataclasses.dataclass(frozen=True)
class View:
    """One of the paper's figures from an experiment's results: the values behind it (one curve per column
    but WORDS) and how it is drawn."""

    name: str  # "Fig. 3", …
    experiment: str
    caption: str
    table: pd.DataFrame
    title: str
    ylabel: str
    dashed: str | None = None  # the column drawn dashed (the unmerged twin beside merges)
    chance: float | None = None

    @property
    def figure(self) -> Figure:
        return plots.curves(self.table, WORDS, self.title, self.ylabel, dashed=self.dashed, chance=self.chance)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def twin_curves(results: Results, scores: pd.DataFrame, experiment: str) -> tuple[pd.DataFrame, str]:
    """Fig. 3's values (words seen, text twin, multimodal twin) and what they score."""
    kept = results.best_text[results.best_text.experiment == experiment]
    if len(kept):
        table = kept.pivot_table(index="words", columns="run", values="accuracy").reset_index()
        what = f"{kept.task.iloc[0]} accuracy on {kept.data.iloc[0]} ({FULL_DATA})"
    else:
        rows = scores[(scores.experiment == experiment) & (scores.task == BLIMP)]
        text = rows[["text_words", "text_twin"]].drop_duplicates("text_words").set_axis(["words", "text"], axis=1)
        mm = rows[["mm_words", "mm_twin"]].drop_duplicates("mm_words").set_axis(["words", "multimodal"], axis=1)
        table = text.merge(mm, on="words", how="outer")
        what = f"{BLIMP} accuracy on the sweep's data (no best-text scores: the paper's is the full BLiMP)"
    table = table.rename(columns={"words": WORDS, "text": "text twin", "multimodal": MM_TWIN})
    return table.sort_values(WORDS).reset_index(drop=True), what


def merge_curves(scores: pd.DataFrame, experiment: str, task: str, alphas: tuple[float, ...],
                 best_words: int | None) -> pd.DataFrame:
    """Per multimodal checkpoint: the multimodal twin and the linear merges at `alphas` with the best
    text checkpoint (`best_words`; None: the text checkpoint at equal words)."""
    rows = scores[(scores.experiment == experiment) & (scores.task == task) & (scores.method == METHOD)]
    rows = rows[rows.text_words == (best_words if best_words is not None else rows.mm_words)]
    rows = rows[rows.alpha.round(6).isin([round(a, 6) for a in alphas])]
    if rows.empty:
        return pd.DataFrame()
    grid = rows.pivot_table(index="mm_words", columns="alpha", values="score")
    grid.columns = [f"α = {a:g}" for a in grid.columns]
    twin = rows.groupby("mm_words")["mm_twin"].first().rename(MM_TWIN)
    return grid.join(twin).rename_axis(WORDS).reset_index()


def best_text_words(results: Results, experiment: str) -> int | None:
    """The words of the text checkpoint with the best best-text accuracy (None without best-text scores)."""
    text = results.best_text[(results.best_text.experiment == experiment) & (results.best_text.run == "text")]
    return None if text.empty else int(text.loc[text.accuracy.idxmax(), "words"])


def views(results: Results, scores: pd.DataFrame, experiment: str) -> list[View]:
    """The paper's figures that this experiment's results have the data for."""
    out = []
    fig3, what = twin_curves(results, scores, experiment)
    if len(fig3):
        out.append(View("Fig. 3", experiment, f"{experiment}: both twins by words seen; {what}", fig3,
                        f"Fig. 3: the twins' BLiMP by words seen ({experiment})", "BLiMP accuracy",
                        chance=chance(BLIMP, "accuracy")))
    best = best_text_words(results, experiment)
    pairing = f"the best text checkpoint ({best:,} words)" if best is not None else "the text checkpoint at equal words"
    fig10 = merge_curves(scores, experiment, BLIMP, PAPER_ALPHAS, best)
    if len(fig10):
        missing = [f"{a:g}" for a in PAPER_ALPHAS if f"α = {a:g}" not in fig10]
        out.append(View("Fig. 10", experiment, f"{experiment}: {BLIMP} (the sweep's data) of the linear merges with "
                        f"{pairing}, beside the multimodal twin"
                        + (f"; α {', '.join(missing)} not in the sweep" if missing else ""),
                        fig10, f"Fig. 10: merges' BLiMP by multimodal checkpoint ({experiment})", "BLiMP accuracy",
                        dashed=MM_TWIN, chance=chance(BLIMP, "accuracy")))
    # the full set first, then BabyLM's, or a part of either that the analysis scores apart (a tag)
    tasks = scores[scores.experiment == experiment].task.unique()
    task = next((t for w in WINOGROUND for t in sorted(tasks) if t.partition("/")[0] == w), None)
    fig11 = merge_curves(scores, experiment, task, (FIG11_ALPHA,), best) if task else pd.DataFrame()
    if len(fig11):
        metric = scores[scores.task == task].metric.iloc[0]
        out.append(View("Fig. 11", experiment, f"{experiment}: {task} {metric} of the multimodal twin and its α = "
                        f"{FIG11_ALPHA:g} merge with {pairing}", fig11,
                        f"Fig. 11: {task} by multimodal checkpoint ({experiment})", f"{task} {metric}",
                        dashed=MM_TWIN, chance=chance(task, metric)))
    return out


def section(results: Results, scores: pd.DataFrame, folder: Path | None) -> tuple[Section | None, str, list[View]]:
    """The report's section of the paper's views (their figures as PNGs under `folder`; None: no PNGs), its
    Markdown and the views; (None, "", []) when no experiment has the data for any of them."""
    tables, figures, markdown, absent, drawn_views = [], [], [], [], []
    for experiment in sorted(scores.experiment.unique()):
        found = views(results, scores, experiment)
        if not found:
            continue
        drawn_views += found
        drawn = {v.name for v in found}
        absent += [f"{experiment}: {name} not drawn: {why}" for name, why in NOT_DRAWN.items() if name not in drawn]
        ref = reference(found, scores, experiment)
        tables.append((f"{experiment}: the paper's numbers beside this run's (percent)", ref))
        markdown.append(f"## {experiment}: the paper's numbers beside this run's (percent)\n\n{markdown_table(ref)}")
        for v in found:
            tables.append((f"{v.name}: {v.caption}", v.table))
            markdown.append(f"## {v.name}: {v.caption}\n\n{markdown_table(v.table)}")
            if folder is not None:
                figures.append((f"{v.name}: {v.caption}", plots.save(
                    v.figure, folder / f"takmaz2025-{v.name.replace('Fig. ', 'fig')}-{experiment}.png")))
    if not tables:
        return None, "", []
    lead = ("Takmaz et al., BabyLM 2025 (arXiv 2510.01845): Fig. 3 (the twins' full BLiMP by words seen), Fig. 10 "
            "(BLiMP of the merges with the best text checkpoint at the paper's α), Fig. 11 (Winoground of the "
            "multimodal twin and its α = 0.3 merge); the paper's stated numbers first.")
    markdown += [f"- {line}" for line in absent]
    return (Section(TITLE, lead, tables, figures, bullets=absent),
            "\n\n".join(markdown) + "\n", drawn_views)


def reference(found: list[View], scores: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """The paper's stated numbers beside this experiment's (percent)."""
    by = {v.name: v.table for v in found}
    ours = {}
    if "Fig. 3" in by:
        t, full = by["Fig. 3"], FULL_DATA in next(v.caption for v in found if v.name == "Fig. 3")
        for run, label in (("text twin", "text-only"), (MM_TWIN, "multimodal")):
            if run in t and t[run].notna().any():
                k = t[run].idxmax()
                ours[f"full BLiMP, best {label} checkpoint"] = f"{_percent(t.at[k, run])} (at {t.at[k, WORDS]:,} words" + (
                    ")" if full else "; the sweep's BLiMP, not the full one)")
    if "Fig. 11" in by:
        values = by["Fig. 11"].drop(columns=WORDS).to_numpy().ravel()
        ours[REFERENCE[-1][0]] = f"{_percent(values.min())}–{_percent(values.max())}"
    rows = [(what, paper, ours.get(what, "")) for what, paper in REFERENCE]
    for task, direction in DIRECTIONS.items():
        twins = scores[(scores.experiment == experiment) & (scores.task == task)]
        if twins.empty:
            continue
        text = twins.loc[twins.text_words.idxmax(), "text_twin"]
        mm = twins.loc[twins.mm_words.idxmax(), "mm_twin"]
        lead = "text-only ahead" if text > mm else "multimodal ahead" if mm > text else "even"
        rows.append((f"{task}: the paired text twin vs the last multimodal checkpoint", direction,
                     f"{lead} ({fmt_number(text)} vs {fmt_number(mm)}; point values, Findings give intervals)"))
    return pd.DataFrame(rows, columns=["", "Takmaz et al. 2025", f"this run ({experiment})"])
