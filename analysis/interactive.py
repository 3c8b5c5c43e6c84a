"""The report's interactive views: one per figure kind, with selectors (task, method, parameters, metric …).

A view holds one Plotly figure (its data and layout, as JSON) for every combination of its selectors'
values; the functions here shape them from the analysis's tables and add no number of their own
(scores, drops, retention, correlations, least-squares lines are the analysis's). The page draws them
with the vendored plotly.js (vendor/README.md) inlined in it: the report needs no network.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from matplotlib.colors import to_hex

from vlmerge.analysis.plots import ALPHA_COLOURS, MM_WORDS, equal_words, log_words, pair_label

PLOTLY = Path(__file__).with_name("vendor") / "plotly-cartesian.min.js"
# pinned: vendor/README.md says where it comes from; tests/test_analysis.py checks the file
PLOTLY_VERSION = "4.1.1"
PLOTLY_SHA256 = "79542150855a52c567260e3137095dbe2b744e6d702a5cabe67da246942fba7a"
DIGITS = 5  # significant digits of a measured value in the page (the tables show 4)
HEIGHT = 460  # pixels


@dataclasses.dataclass(frozen=True)
class View:
    """One interactive figure: its selectors' labels (each narrows the next one's choices) and a Plotly
    figure per combination of their values."""

    key: str  # the element's id, a plain name
    selectors: list[str]
    figures: list[tuple[tuple[str, ...], dict]]
    initial: tuple[str, ...] = ()  # the keys of the figure shown first (default: the first figure's)

    def trimmed(self) -> View:
        """The view less the selectors that have one value in every figure (nothing to choose)."""
        keep = [i for i in range(len(self.selectors)) if len({keys[i] for keys, _ in self.figures}) > 1]
        return View(self.key, [self.selectors[i] for i in keep],
                    [(tuple(keys[i] for i in keep), fig) for keys, fig in self.figures],
                    tuple(self.initial[i] for i in keep) if self.initial else ())


def values(series: Iterable[float]) -> list[float | None]:
    """Measured values for the page: DIGITS significant digits, NaN as null (a gap)."""
    return [float(f"{v:.{DIGITS}g}") if math.isfinite(v) else None for v in map(float, series)]


def _layout(title: str, xlabel: str, ylabel: str, **more) -> dict:
    return {"title": {"text": title, "font": {"size": 14}}, "height": HEIGHT, "margin": {"t": 60},
            "xaxis": {"title": {"text": xlabel}}, "yaxis": {"title": {"text": ylabel}}, **more}


def curves(table: pd.DataFrame, x: str, title: str, ylabel: str, *, dashed: str | None = None,
           chance: float | None = None) -> dict:
    """One line per column of `table` but `x` (words seen), as plots.curves draws them."""
    table = table.sort_values(x)
    lines = [c for c in table.columns if c != x]
    data = []
    for k, column in enumerate(lines):
        colour = "black" if column == dashed else to_hex(ALPHA_COLOURS(k / max(1, len(lines) - 1)))
        rows = table[[x, column]].dropna()
        data.append({"type": "scatter", "mode": "lines+markers", "name": str(column), "x": rows[x].tolist(),
                     "y": values(rows[column]), "marker": {"size": 5},
                     "line": {"color": colour, **({"dash": "dash"} if column == dashed else {})}})
    if chance is not None and len(table):
        data.append({"type": "scatter", "mode": "lines", "name": f"chance ({chance:.3g})", "hoverinfo": "skip",
                     "x": table[x].agg(["min", "max"]).tolist(), "y": [chance, chance],
                     "line": {"color": "grey", "dash": "dot", "width": 1}})
    layout = _layout(title, x, ylabel)
    layout["xaxis"]["type"] = "log" if len(table) and log_words(table[x]) else "linear"
    return {"data": data, "layout": layout}


def words_table(rows: pd.DataFrame, value: str) -> pd.DataFrame:
    """`value` of one setting and task by the multimodal checkpoint's words (column MM_WORDS), one column per α:
    the lines of plots.score_vs_words."""
    grid = equal_words(rows).groupby(["mm_words", "alpha"])[value].mean().unstack("alpha")
    grid.columns = [f"α = {a:g}" for a in grid.columns]
    return grid.rename_axis(MM_WORDS).reset_index()


def heatmap(rows: pd.DataFrame, value: str, title: str, label: str) -> dict:
    """`value` per checkpoint pair (rows, the first on top) and α (columns), as plots.heatmap draws the score."""
    # the pairs and α of `rows`, every one (pivot_table would leave out those whose values are all NaN)
    grid = rows.groupby(["text_words", "mm_words", "alpha"])[value].mean().unstack("alpha")
    trace = {"type": "heatmap", "z": [values(row) for row in grid.to_numpy()],
             "x": [f"{a:g}" for a in grid.columns], "y": [pair_label(t, m) for t, m in grid.index],
             "colorscale": "Viridis", "colorbar": {"title": {"text": label}},
             "hovertemplate": "α = %{x}<br>%{y} words<br>" + label + " %{z}<extra></extra>"}
    if grid.size <= 300:
        trace["texttemplate"] = "%{z:.3g}"
    layout = _layout(title, "α (weight of the text-only model)", "checkpoint (words seen)",
                     height=max(HEIGHT, 22 * grid.shape[0] + 160))  # rows stay readable
    layout["xaxis"]["type"] = "category"
    layout["yaxis"].update(type="category", autorange="reversed")
    return {"data": [trace], "layout": layout}


def scatter_fit(points: pd.DataFrame, fit: tuple[float, float] | None, title: str, xlabel: str,
                ylabel: str) -> dict:
    """`points` (x, y, label) and, given as (slope, intercept), the least-squares line over their x range."""
    data = [{"type": "scatter", "mode": "markers", "name": "checkpoint pairs", "x": values(points.x),
             "y": values(points.y), "text": points.label.tolist(), "marker": {"size": 8},
             "hovertemplate": "%{text}<br>x = %{x}<br>y = %{y}<extra></extra>"}]
    if fit is not None and len(points):
        xs = [float(points.x.min()), float(points.x.max())]
        data.append({"type": "scatter", "mode": "lines", "name": "least squares", "x": values(xs),
                     "y": values(fit[0] * x + fit[1] for x in xs), "line": {"color": "#d62728"}})
    return {"data": data, "layout": _layout(title, xlabel, ylabel)}


def _element_id(key: str) -> str:
    return f"view-{key}"


def view_html(view: View) -> str:
    """The view's selectors and plot area (the page's script fills them)."""
    selects = "".join(f"<label>{html.escape(label)} <select data-selector='{i}'></select></label>"
                      for i, label in enumerate(view.selectors))
    return (f"<div class='view' id='{_element_id(view.key)}'><div class='selectors'>{selects}</div>"
            f"<div class='plot' style='min-height:{HEIGHT}px'></div></div>")


def factored(figures: list[dict]) -> tuple[dict, list[dict]]:
    """What every figure of a view shares, and the figures less it (the page holds each once): the layout's
    top-level keys, and per trace position the keys, whose value is the same in every figure (that has such
    a trace). A figure is its shared part updated with its own."""
    def shared(parts: list[dict]) -> dict:
        return {k: v for k, v in parts[0].items() if all(k in p and p[k] == v for p in parts[1:])} if parts else {}

    layout = shared([f["layout"] for f in figures])
    traces = [shared([f["data"][i] for f in figures if len(f["data"]) > i])
              for i in range(max((len(f["data"]) for f in figures), default=0))]
    own = [{"data": [{k: v for k, v in t.items() if k not in traces[i]} for i, t in enumerate(f["data"])],
            "layout": {k: v for k, v in f["layout"].items() if k not in layout}} for f in figures]
    return {"layout": layout, "traces": traces}, own


# Each view: the figures whose keys match the selectors before a selector give its choices (in the
# figures' order); a change redraws the one figure that matches them all, its own parts over the shared
# ones (copied: Plotly writes into what it draws).
DRAW = """
(() => {
  const views = JSON.parse(document.getElementById("vlmerge-views").textContent);
  for (const [id, {shared, figures, initial}] of Object.entries(views)) {
    let start = initial;  // the first choices, then the user's
    const root = document.getElementById(id);
    const plot = root.querySelector(".plot");
    const selects = Array.from(root.querySelectorAll("select"));
    const matching = n => figures.filter(f => selects.slice(0, n).every((s, i) => f.keys[i] === s.value));
    const update = () => {
      selects.forEach((s, i) => {
        const choices = [...new Set(matching(i).map(f => f.keys[i]))];
        if (choices.join("\\n") !== Array.from(s.options, o => o.value).join("\\n")) {
          const kept = start.length ? start[i] : s.value;
          s.replaceChildren(...choices.map(c => new Option(c, c)));
          s.value = choices.includes(kept) ? kept : choices[0];
        }
      });
      start = [];
      const figure = matching(selects.length)[0];
      const data = figure.data.map((trace, i) => structuredClone({...shared.traces[i], ...trace}));
      const layout = structuredClone({...shared.layout, ...figure.layout});
      Plotly.react(plot, data, layout, {displaylogo: false, responsive: true});
    };
    selects.forEach(s => s.addEventListener("change", update));
    update();
  }
})();
"""


def _inline(data: str) -> str:
    """JSON that is safe inside a <script> element: no `<` to open or close a tag (`\\u003c` is JSON's for it)."""
    return data.replace("<", "\\u003c")


def script(views: list[View]) -> str:
    """The page's scripts: plotly.js, the views' figures (JSON) and the code that draws them."""
    figures = {}
    for v in views:
        shared, own = factored([fig for _, fig in v.figures])
        figures[_element_id(v.key)] = {"shared": shared, "initial": list(v.initial),
                                       "figures": [{"keys": list(keys), **fig} for (keys, _), fig in zip(v.figures, own)]}
    payload = json.dumps(figures, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # plotly.js has no "</script" in it (the pinned file, tests/test_analysis.py)
    return (f"<script>{PLOTLY.read_text(encoding='utf-8')}</script>\n"
            f"<script type='application/json' id='vlmerge-views'>{_inline(payload)}</script>\n"
            f"<script>{DRAW}</script>")
