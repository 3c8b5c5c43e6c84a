"""Offline analysis of the Parquet results: tables, correlations, figures and one HTML report.

Runs on a laptop with the results copied over: it imports pandas, pyarrow, scipy and
matplotlib, never torch. `vlmerge analyze --results DIR --out DIR`, `python -m analysis …`,
or `analysis.analyze(results, out, options)`.
"""

from analysis.run import analyze

__all__ = ["analyze"]
