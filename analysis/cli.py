"""`vlmerge analyze` and `python -m vlmerge.analysis`: the analysis's command line (no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmerge.config import Config, load_config
from vlmerge.errors import VlmergeError
from vlmerge.io import check_creatable

HELP = "offline: results → tables, correlations, figures and one HTML report (no torch)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", action="append", default=[], metavar="DIR",
                   help="results/<experiment> or a folder of them (repeatable; default: the config's)")
    p.add_argument("--out", help="folder for the report (default: reports/<experiment> under the output root)")
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="runs/<experiment> for the training curves (default: the one beside each results folder)")


def run(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.analysis.run import analyze

    results = [Path(r) for r in args.results] or [cfg.layout.results_dir]
    out = Path(args.out) if args.out else cfg.layout.report_dir
    if out.exists() and not out.is_dir():
        raise VlmergeError(f"{out}: --out is a file; expected a folder for the report")
    check_creatable(out)  # before the analysis, not after
    report = analyze(results, out, cfg.analysis, runs=[Path(r) for r in args.runs] if args.runs else None)
    print(f"analyze: report {report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmerge.analysis", description=HELP)
    parser.add_argument("--config", help="experiment YAML (default: the embedded demo config)")
    add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. analysis.tolerance=0.01")
    args = parser.parse_args(argv)
    try:
        run(load_config(args.config, args.overrides), args)
    except VlmergeError as e:
        print(f"vlmerge analyze: error: {e}", file=sys.stderr)
        return 2
    return 0
