"""Rendering: Markdown tables, the self-contained HTML report (figures embedded), the summary."""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path

import pandas as pd


def fmt_number(value: float) -> str:
    """4 significant digits."""
    return f"{value + 0.0:.4g}"  # + 0.0 turns -0.0 into 0


@dataclasses.dataclass(frozen=True)
class Section:
    """A titled part of the report: a lead paragraph, bullets, groups of bullets (collapsed), tables, HTML
    fragments (interactive views) and figures (PNG paths), in this order."""

    title: str
    lead: str = ""
    tables: list[tuple[str, pd.DataFrame]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, Path]] = dataclasses.field(default_factory=list)
    bullets: list[str] = dataclasses.field(default_factory=list)  # shown after the lead
    groups: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)  # (name, bullets), collapsed
    html: list[str] = dataclasses.field(default_factory=list)


COLLAPSE_ROWS = 15  # a longer table is collapsed (its caption and size shown)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else fmt_number(value)
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits, NaN empty)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _figure_html(caption: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .6rem 0 1.2rem; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
th { background: #f3f3f3; } caption { text-align: left; font-weight: 600; padding: .3rem 0; }
figure { margin: 1rem 0 2rem; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; } .notes li { color: #8a4b00; } .wide { overflow-x: auto; }
details { margin: .3rem 0; } summary { cursor: pointer; } .notes summary { color: #8a4b00; }
.view { margin: .6rem 0 1.6rem; } .selectors label { margin-right: 1rem; font-size: .9rem; }
"""


def _bullets(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in items) + "</ul>"


def _table_html(caption: str, frame: pd.DataFrame) -> str:
    table = frame.to_html(index=False, na_rep="", float_format=fmt_number, border=0)
    table = f"<div class='wide'>{table.replace('<thead>', f'<caption>{html.escape(caption)}</caption><thead>', 1)}</div>"
    if len(frame) <= COLLAPSE_ROWS:
        return table
    return f"<details><summary>{html.escape(caption)} ({len(frame)} rows)</summary>{table}</details>"


def html_report(title: str, intro: str, notes: list[str], sections: list[Section], script: str = "") -> str:
    """One HTML page with everything inside it (no external files); `script`: its <script> elements."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    if notes:  # one line until opened: the page opens with its first section
        parts.append(f"<details class='notes'><summary>Notes ({len(notes)})"
                     f"</summary>{_bullets(notes)}</details>")
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.lead:
            parts.append(f"<p>{html.escape(s.lead)}</p>")
        if s.bullets:
            parts.append(_bullets(s.bullets))
        parts += [f"<details><summary>{html.escape(name)} ({len(items)})</summary>{_bullets(items)}</details>"
                  for name, items in s.groups]
        parts += [_table_html(caption, frame) for caption, frame in s.tables]
        parts += s.html
        parts += [_figure_html(caption, path) for caption, path in s.figures]
    parts.append(script + "</body></html>")
    return "\n".join(parts)


def markdown_summary(title: str, intro: str, notes: list[str], tables: list[tuple[str, pd.DataFrame]],
                     findings: list[str] = (), more: str = "") -> str:
    """The short Markdown summary: intro, findings (`more`: a line after them), key tables, notes."""
    out = [f"# {title}", "", intro, ""]
    if findings:
        out += ["## Findings", "", *(f"- {f}" for f in findings), "", *([more, ""] if more else [])]
    for caption, frame in tables:
        out += [f"## {caption}", "", markdown_table(frame) if len(frame) else "(none)", ""]
    if notes:
        out += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)
