"""α per tensor: a merge's α by layer and by module, in mergekit's parameter syntax.

A schedule (the merge parameter `schedule`) is a list of conditions, the first whose `filter` is a
substring of the tensor's name giving that tensor its α (no filter, or "*", matches every tensor):

    [{filter: multi_modal_projector, value: 0}, {filter: self_attn, value: [0, 1]}]

A value is a number, `alpha` (the merge's own α: the sweep's grid, `--alpha`), or a gradient: a
list of those, interpolated over the decoder layers as mergekit does (layer i of N at
t = i/(N−1), the list's K values at t·(K−1); tensors outside the layers at t = 0). A tensor that
no condition matches keeps the merge's α; a bare list is a gradient for every tensor. So
"projector at 0, the rest at α" is `[{filter: multi_modal_projector, value: 0}]`, and `[0, 1]`
goes from the multimodal model in the first layer to the text model in the last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vlmerge.config import alpha_problem
from vlmerge.errors import VlmergeError

SCHEDULE = "schedule"  # the merge parameter that holds it, beside the method's own
ALPHA = "alpha"  # a value that stands for the merge's α
_LAYER = re.compile(r"\.layers\.(\d+)\.")

Value = float | str | list  # a number, ALPHA, or a gradient of those


def check_schedule(spec: Any, allow_extrapolation: bool = False) -> list[dict[str, Any]]:
    """The schedule as a list of conditions {filter, value}, each value checked; a one-line error naming
    what is wrong otherwise."""
    if isinstance(spec, bool) or not isinstance(spec, (list, int, float, str)) or spec == []:
        raise VlmergeError(f"schedule {spec!r}: expected a list of {{filter, value}} conditions or a gradient list")
    gradient = isinstance(spec, list) and all(not isinstance(c, dict) for c in spec)
    conditions = [{"value": spec}] if gradient or not isinstance(spec, list) else spec
    out = []
    for c in conditions:
        if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
            raise VlmergeError(f"schedule condition {c!r}: expected {{filter: NAME PART, value: V}} (filter optional)")
        for v in c["value"] if isinstance(c["value"], list) else [c["value"]]:
            if v == ALPHA:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise VlmergeError(f"schedule condition {c!r}: {v!r} is neither a number nor {ALPHA!r}")
            problem = alpha_problem([float(v)], allow_extrapolation)  # the one rule of every α
            if problem:
                raise VlmergeError(f"schedule condition {c!r}: {problem}")
        if isinstance(c["value"], list) and not c["value"]:
            raise VlmergeError(f"schedule condition {c!r}: an empty gradient")
        out.append({"filter": c.get("filter"), "value": c["value"]})
    return out


def layer_position(name: str, num_layers: int) -> float:
    """t of a tensor: i/(N−1) in decoder layer i of N (1 when N is 1), 0 outside the layers (mergekit's)."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m[1]) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(value: Value, alpha: float, t: float) -> float:
    """A condition's value at the merge's α and the tensor's position t."""
    if not isinstance(value, list):
        return alpha if value == ALPHA else float(value)
    values = [evaluate(v, alpha, t) for v in value]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def tensor_alpha(name: str, alpha: float, conditions: Sequence[dict[str, Any]], num_layers: int) -> float:
    """The α of one tensor: the first matching condition's value, or the merge's α."""
    for c in conditions:
        if c["filter"] in (None, "*") or c["filter"] in name:
            return evaluate(c["value"], alpha, layer_position(name, num_layers))
    return alpha


def num_layers(names: Sequence[str]) -> int:
    """The decoder layers of a model, from its tensor names."""
    return 1 + max((int(m[1]) for m in map(_LAYER.search, names) if m), default=-1)
