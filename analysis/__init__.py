"""Offline analysis of the Parquet results: tables, correlations, figures and one HTML report.

Runs on a laptop with the results copied over: it imports pandas, pyarrow, scipy and
matplotlib, never torch, and of vlmerge only its core (config, layout, results, io, errors).
`vlmerge analyze --results DIR --out DIR`, `python -m vlmerge.analysis …`, or
`vlmerge.analysis.analyze(results, out, options)`.
"""


def analyze(*args, **kwargs):
    """`vlmerge.analysis.run.analyze`, imported on first use (pandas and matplotlib are slow to import)."""
    from vlmerge.analysis.run import analyze as run

    return run(*args, **kwargs)


__all__ = ["analyze"]
