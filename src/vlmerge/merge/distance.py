"""Weight distances between two models (Sung et al. 2023, §7), whole model and per layer.

Over the flattened weights x and y of a scope:

    L2     = ‖x − y‖
    cosine = 1 − x·y / (‖x‖‖y‖)
    SSD    = 1 − (1/L) Σ |xᵢ + yᵢ| / (|xᵢ| + |yᵢ|)       (positions where both are 0 left out)
    TSSD   = SSD after zeroing the k = 50% smallest-magnitude entries of x and of y

In the `task_vector` space x = θ_text − θ₀ and y = θ_mm − θ₀. Scopes: `model` (every tensor),
`transformer` (the decoder layers only, as Sung et al.), `layer.N`, and the other top modules.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlmerge.io import atomic_path
from vlmerge.merge.io import ModelDir, check_compatible
from vlmerge.results import DISTANCES_SCHEMA, checkpoint_run

METRICS = ("l2", "cosine", "ssd", "tssd")
TSSD_K = 0.5
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# -- the maths on whole vectors (reference definitions; the streaming code below agrees) -----------

def l2(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double() - y.double()).norm().item()


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return 1.0 - (x @ y / (x.norm() * y.norm())).item()


def sign_ratio_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(Σ |xᵢ + yᵢ| / (|xᵢ| + |yᵢ|), number of positions) over positions where x or y is non-zero."""
    x, y = x.double().flatten(), y.double().flatten()
    den = x.abs() + y.abs()
    keep = den > 0
    return ((x + y).abs()[keep] / den[keep]).sum().item(), int(keep.sum())


def ssd(x: torch.Tensor, y: torch.Tensor) -> float:
    total, n = sign_ratio_sum(x, y)
    return 1.0 - total / n if n else 0.0


def keep_top(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with the entries of magnitude below `threshold` zeroed."""
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def tssd(x: torch.Tensor, y: torch.Tensor, k: float = TSSD_K) -> float:
    return ssd(keep_top(x, trim_threshold(x, k)), keep_top(y, trim_threshold(y, k)))


def trim_threshold(x: torch.Tensor, k: float = TSSD_K) -> float:
    """Keep the (1−k) share of largest magnitudes: threshold = the smallest kept magnitude."""
    flat = x.abs().flatten().float()
    keep = flat.numel() - int(k * flat.numel())
    if keep <= 0:
        return float("inf")
    return flat.kthvalue(flat.numel() - keep + 1).values.item()


# -- streaming over two model directories ------------------------------------------------------------

# The scopes of the whole-model rows: every tensor, and the decoder layers alone (Sung et al.
# measure the transformer: no embeddings, LM head or projector).
WHOLE = ("model", "transformer")


def scopes_of(name: str) -> list[str]:
    """'model', and 'transformer' plus the layer (`layer.3`) for a layer's tensor, or the top module
    (`embed_tokens`, `lm_head`, …) for any other."""
    m = _LAYER.search(name)
    if m:
        return ["model", "transformer", f"layer.{m.group(1)}"]
    parts = [p for p in name.split(".") if p not in ("model", "language_model")]
    return ["model", parts[0] if parts else name]


@dataclasses.dataclass
class _Sums:
    sq: float = 0.0
    dot: float = 0.0
    xx: float = 0.0
    yy: float = 0.0
    ratio: float = 0.0
    n: int = 0
    t_ratio: float = 0.0
    t_n: int = 0

    def values(self) -> dict[str, float]:
        norm = (self.xx * self.yy) ** 0.5
        return {
            "l2": self.sq ** 0.5,
            "cosine": 1.0 - self.dot / norm if norm else 0.0,
            "ssd": 1.0 - self.ratio / self.n if self.n else 0.0,
            "tssd": 1.0 - self.t_ratio / self.t_n if self.t_n else 0.0,
        }


def _vectors(a: ModelDir, b: ModelDir, base: ModelDir | None, name: str,
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = a.get(name).to(device).double(), b.get(name).to(device).double()
    if base is not None:
        z = base.get(name).to(device).double()
        x, y = x - z, y - z
    return x.flatten(), y.flatten()


def distances(a: ModelDir, b: ModelDir, base: ModelDir | None = None, *, per_layer: bool = True,
              device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """{scope: {metric: value}}; in task-vector space when `base` is given. Two passes over the
    tensors (each read onto `device`): the first finds each scope's TSSD thresholds, the second
    accumulates the sums."""
    check_compatible(a, b, what="the two models")
    if base is not None:
        check_compatible(a, base, what="the model and the base")
    names = [n for n in a.names() if a.specs[n][0].is_floating_point]
    keep = (lambda scopes: scopes) if per_layer else (lambda scopes: [s for s in scopes if s in WHOLE])

    magnitudes: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for name in names:
        x, y = _vectors(a, b, base, name, device)
        for scope in keep(scopes_of(name)):
            magnitudes[scope][0].append(x.abs().float())
            magnitudes[scope][1].append(y.abs().float())
    thresholds = {s: (trim_threshold(torch.cat(xs)), trim_threshold(torch.cat(ys)))
                  for s, (xs, ys) in magnitudes.items()}
    del magnitudes

    sums: dict[str, _Sums] = defaultdict(_Sums)
    for name in names:
        x, y = _vectors(a, b, base, name, device)
        for scope in keep(scopes_of(name)):
            s = sums[scope]
            s.sq += (x - y).pow(2).sum().item()
            s.dot += (x @ y).item()
            s.xx += (x @ x).item()
            s.yy += (y @ y).item()
            r, n = sign_ratio_sum(x, y)
            s.ratio, s.n = s.ratio + r, s.n + n
            tx, ty = thresholds[scope]
            r, n = sign_ratio_sum(keep_top(x, tx), keep_top(y, ty))
            s.t_ratio, s.t_n = s.t_ratio + r, s.t_n + n
    return {scope: s.values() for scope, s in sums.items()}


def distance_rows(text: ModelDir, mm: ModelDir, base: ModelDir | None, *, per_layer: bool = True,
                  device: torch.device | str = "cpu") -> pd.DataFrame:
    """Rows of the distances dataset (docs/architecture.md, "Results"): weights space, and task-vector
    space with a base."""
    t, m = checkpoint_run(text.path), checkpoint_run(mm.path)
    rows = []
    for space, b in (("weights", None), ("task_vector", base)):
        if space == "task_vector" and base is None:
            continue
        for scope, values in distances(text, mm, b, per_layer=per_layer, device=device).items():
            rows += [{"experiment": t["experiment"] or m["experiment"], "text_run": t["run"], "mm_run": m["run"],
                      "text_words": t["words"], "mm_words": m["words"], "space": space, "scope": scope,
                      "metric": metric, "value": values[metric]} for metric in METRICS]
    return pd.DataFrame(rows).astype({"text_words": "Int64", "mm_words": "Int64"})


def write_parquet(frame: pd.DataFrame, path: Path, study: str = "") -> None:
    """Distance rows as the distances dataset's file `path`, atomically (`study`: their study column)."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame.assign(study=study), schema=DISTANCES_SCHEMA, preserve_index=False), tmp)
