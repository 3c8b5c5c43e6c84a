"""The registry of merge methods. A method is one module of this package that calls `register`.

Every method is a pure function of one tensor's inputs (`TensorInputs`) and the weight α of
the TEXT model: θ = α·θ_text + (1−α)·θ_mm for `linear`, so α = 0 gives the multimodal model and
α = 1 the text model. Methods that work on task vectors (θ − θ₀) need `base`, the shared
initialisation (or any third model, for three-way merges).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vlmerge.errors import VlmergeError
from vlmerge.registry import Registry, import_submodules


@dataclasses.dataclass(frozen=True)
class TensorInputs:
    name: str
    text: torch.Tensor
    mm: torch.Tensor
    base: torch.Tensor | None = None
    grams: tuple[torch.Tensor, torch.Tensor] | None = None  # RegMean: (G_text, G_mm) of a linear layer

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base is None:
            raise VlmergeError(f"{self.name}: this method needs a base model (--base)")
        return self.text - self.base, self.mm - self.base


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]  # fn(inputs: TensorInputs, alpha: float, **params) -> tensor
    defaults: dict[str, Any]
    needs_base: bool = False
    needs_grams: bool = False
    # prepare(all tensors' inputs, params) -> extra keyword arguments of fn, for methods that
    # need a statistic of the whole model first (e.g. TIES with one threshold for all tensors).
    prepare: Callable[..., dict[str, Any]] | None = None
    # same_as(alpha, params) -> "text", "mm" or None: the input whose every floating tensor the
    # merge equals bitwise at this α (linear at α = 1 and 0), so that a file can be copied.
    same_as: Callable[[float, dict[str, Any]], str | None] | None = None
    # fn accepts out= (a float32 tensor of the result's shape) and writes the result there: the
    # streamed merge then reuses a few buffers instead of allocating every output afresh.
    takes_out: bool = False

    def copies(self, alpha: float, params: dict[str, Any]) -> str | None:
        """The input role the merge at α equals bitwise, or None."""
        return self.same_as(alpha, params) if self.same_as else None

    def params(self, given: dict[str, Any]) -> dict[str, Any]:
        """The method's defaults overridden by `given`; an unknown parameter is an error."""
        unknown = set(given) - set(self.defaults)
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise VlmergeError(f"method {self.name}: unknown parameter {sorted(unknown)[0]!r} (allowed: {allowed})")
        return {**self.defaults, **given}


METHODS: Registry[Method] = Registry("merge method")
get_method = METHODS.lookup


def register(name: str, *, needs_base: bool = False, needs_grams: bool = False,
             prepare: Callable[..., dict[str, Any]] | None = None,
             same_as: Callable[[float, dict[str, Any]], str | None] | None = None, takes_out: bool = False,
             **defaults: Any):
    """Decorator: make `fn` the merge method `name`, with these parameter defaults."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS[name] = Method(name, fn, defaults, needs_base, needs_grams, prepare, same_as, takes_out)
        return fn

    return wrap


import_submodules(__name__, __path__)
