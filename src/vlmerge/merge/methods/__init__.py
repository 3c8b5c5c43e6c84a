"""The registry of merge methods. A method is one module of this package that calls `register`.

Every method is a pure function of one tensor's inputs (`TensorInputs`), a weight α and its
declared parameters, and declares what it merges (`inputs`):

- `twins`: the text and multimodal models; α is the weight of the TEXT model: θ = α·θ_text +
  (1−α)·θ_mm for `linear`, so α = 0 gives the multimodal model and α = 1 the text model.
- `experts`: the modality experts of one expert checkpoint (Sung et al.: W^l, W^v, and W^vl in
  the top layers), merged into one agnostic tensor; α is the weight of the VISION expert.

Methods that work on task vectors (θ − θ₀) need `base`: the twins' shared initialisation (or any
third model, for three-way merges), the seed weights W_seed of an expert model. A method with
`takes_alpha=False` has no α (it is called with None); data-based methods name the data
statistics of each input they need (`statistics`: `grams`, `fisher`; see
`vlmerge.merge.statistics`), which reach them in `TensorInputs.statistics`.

A parameter is declared with its default, `lam=1.0` (any finite number), or with its range or
choices too, `p=Param(0.5, 0, 1, high_open=True)`: a value outside it is refused with the parameter's
name before any work (`vlmerge merge`, and `sweep plan` for every combination of a method's grid).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from vlmerge.errors import VlmergeError
from vlmerge.registry import Registry, import_submodules, with_defaults
from vlmerge.modelkey import MM_ALPHA, TEXT_ALPHA


TWINS, EXPERTS = "twins", "experts"  # what a method merges (Method.inputs)


@dataclasses.dataclass(frozen=True)
class Param:
    """A declared parameter: its default, and the choices it may take or its range of numbers.

    A number lies in [low, high] (a bound None: unbounded; `low_open`/`high_open` leave that end out), and
    is finite: NaN and ±inf are never a parameter's value. A whole-number default makes a whole-number
    parameter (a seed, a count).
    """

    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def whole(self) -> bool:
        return isinstance(self.default, int) and not isinstance(self.default, bool)

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None."""
        if self.choices is not None:
            # Compared with their types too: YAML's 1 is not the choice True.
            ok = any(type(value) is type(c) and value == c for c in self.choices)
            return None if ok else f"expected one of {', '.join(map(repr, self.choices))}"
        number = isinstance(value, int if self.whole else (int, float)) and not isinstance(value, bool)
        if not number:
            return "expected a whole number" if self.whole else "expected a number"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite:
            return "expected a finite number"
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return None if above and below else f"expected a value in {self.describe()}"

    def describe(self) -> str:
        """The choices (`a|b`) or the range (`[0, 1)`)."""
        if self.choices is not None:
            return "|".join(map(str, self.choices))
        low, high = ("-inf" if self.low is None else _bound(self.low)), ("inf" if self.high is None else _bound(self.high))
        return (f"{'(' if self.low is None or self.low_open else '['}{low}, "
                f"{high}{')' if self.high is None or self.high_open else ']'}")


def _bound(b: float) -> str:
    return f"{b:g}" if isinstance(b, float) else str(b)


SEED = Param(0, 0, 2**32 - 1)  # the random methods' seed (parts.generator's arithmetic stays in range)


@dataclasses.dataclass(frozen=True)
class TensorInputs:
    """One tensor of every input, by role: `text` and `mm` (twins), or `language`, `vision` (and
    `cross`) (experts); the base; the data statistics of this tensor, {statistic: {role: tensor}},
    only those that every input has (a norm has no Gram matrix)."""

    name: str
    models: dict[str, torch.Tensor]
    base: torch.Tensor | None = None
    statistics: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def twins(cls, name: str, text: torch.Tensor, mm: torch.Tensor, base: torch.Tensor | None = None,
              statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> TensorInputs:
        return cls(name, {"text": text, "mm": mm}, base,
                   {s: dict(zip(("text", "mm"), pair)) for s, pair in (statistics or {}).items()})

    @property
    def text(self) -> torch.Tensor:
        return self.models["text"]

    @property
    def mm(self) -> torch.Tensor:
        return self.models["mm"]

    def to(self, device: torch.device | str) -> TensorInputs:
        """The same inputs on `device` (where the sweep merges them at every α)."""
        def move(tensors):
            return {k: t.to(device) for k, t in tensors.items()}

        return TensorInputs(self.name, move(self.models), None if self.base is None else self.base.to(device),
                            {s: move(by_role) for s, by_role in self.statistics.items()})

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base is None:
            raise VlmergeError(f"{self.name}: this method needs a base model (--base)")
        return self.text - self.base, self.mm - self.base


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method: its per-tensor function and its declared parameters (with defaults)."""

    name: str
    fn: Callable[..., torch.Tensor]  # fn(inputs: TensorInputs, alpha: float | None, **params) -> tensor
    declared: dict[str, Param]
    inputs: str = TWINS  # TWINS or EXPERTS
    takes_alpha: bool = True
    needs_base: bool = False
    statistics: tuple[str, ...] = ()  # the data statistics of each input it needs
    # prepare(all tensors' inputs, params) -> extra keyword arguments of fn, for methods that
    # need a statistic of the whole model first (e.g. TIES with one threshold for all tensors).
    prepare: Callable[..., dict[str, Any]] | None = None
    # same_as(alpha, params) -> "text", "mm" or None: the input the merge equals, by its maths,
    # at this α (e.g. linear at α = 1 and 0). The merge then returns that input bitwise.
    same_as: Callable[[float, dict[str, Any]], str | None] | None = None

    @property
    def takes_out(self) -> bool:
        """Whether fn can write into a given float32 buffer (`out=`): the streamed merge then
        reuses a few buffers instead of allocating every output afresh."""
        return "out" in inspect.signature(self.fn).parameters

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.declared.items()}

    @property
    def merges_experts(self) -> bool:
        return self.inputs == EXPERTS

    def copies(self, alpha: float | None, params: dict[str, Any]) -> str | None:
        """The input role the merge at α equals bitwise, or None."""
        return self.same_as(alpha, params) if self.same_as else None

    def merge(self, x: TensorInputs, alpha: float | None, params: dict[str, Any],
              out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor merged at α; where `same_as` names an input, that input itself (do not
        modify the result in place), or a copy in `out`."""
        role = self.copies(alpha, params)
        if role:
            same = x.models[role]
            return same if out is None else out.copy_(same)
        if out is not None and self.takes_out:
            return self.fn(x, alpha, **params, out=out)
        return self.fn(x, alpha, **params)

    def params(self, given: dict[str, Any]) -> dict[str, Any]:
        """The method's defaults overridden by `given`; an unknown parameter or one out of its range is an error."""
        full = with_defaults(f"method {self.name}", self.defaults, given)
        for key, value in given.items():
            problem = self.declared[key].problem(value)
            if problem:
                raise VlmergeError(f"method {self.name}: parameter {key}={value!r}: {problem}")
        return full


def endpoint(alpha: float, params: dict[str, Any]) -> str | None:
    """α = 1 is the text model and α = 0 the multimodal one (the merge convention)."""
    return {TEXT_ALPHA: "text", MM_ALPHA: "mm"}.get(alpha)


METHODS: Registry[Method] = Registry("merge method")
get_method = METHODS.lookup


def register(name: str, *, inputs: str = TWINS, takes_alpha: bool = True, needs_base: bool = False,
             statistics: tuple[str, ...] = (), prepare: Callable[..., dict[str, Any]] | None = None,
             same_as: Callable[[float, dict[str, Any]], str | None] | None = None, **params: Any):
    """Decorator: make `fn` the merge method `name`, with these parameters (a default, or a `Param`)."""
    if inputs not in (TWINS, EXPERTS):
        raise ValueError(f"merge method {name}: inputs must be {TWINS!r} or {EXPERTS!r}, not {inputs!r}")

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        declared = {k: v if isinstance(v, Param) else Param(v) for k, v in params.items()}
        METHODS.add(name, Method(name, fn, declared, inputs, takes_alpha, needs_base, tuple(statistics), prepare,
                                 same_as))
        return fn

    return wrap


import_submodules(__name__, __path__)
