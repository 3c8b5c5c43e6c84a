"""Merging a text/multimodal pair: streamed to disk (`vlmerge merge`), or in memory for the sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from vlmerge import code_version
from vlmerge.config import alpha_problem
from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, check_creatable, remove_stale_temps, same_record, write_json, write_text
from vlmerge.layout import merge_outputs, mergekit_recipe, model_card, statistics_file
from vlmerge.merge.io import ModelDir, SafetensorsWriter, check_compatible, numel
from vlmerge.merge.methods import Method, TensorInputs, get_method
from vlmerge.merge.recipe import merge_card, merge_command, mergekit_yaml
from vlmerge.merge.schedule import SCHEDULE, check_schedule, num_layers, tensor_alpha

RECORD = "merge.json"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json")


def check_alphas(alphas: Sequence[float | None], allow_extrapolation: bool, method: Method) -> list[float | None]:
    """The alphas as floats, or a one-line error: non-empty, finite, unique, in [0, 1] unless extrapolating;
    for a method without α (model_stock), [None]: it takes none."""
    if not method.takes_alpha:
        if any(a is not None for a in alphas):
            raise VlmergeError(f"method {method.name} takes no α (its weights come from the models): leave out --alpha")
        return [None]
    if not alphas or any(a is None for a in alphas):
        raise VlmergeError(f"method {method.name} needs an α (--alpha, the weight of the text model)")
    out = [float(a) for a in alphas]
    problem = alpha_problem(out, allow_extrapolation)
    if problem:
        raise VlmergeError(problem.replace("allow extrapolation", "pass --allow-extrapolation"))
    return out


def load_statistics(checkpoint: Path, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{statistic: {weight name: tensor}} of one checkpoint, or a one-line error naming the missing file."""
    out = {}
    for name in names:
        path = statistics_file(checkpoint, name)
        if not path.is_file():
            raise VlmergeError(f"{checkpoint}: no {path.name}; compute it with "
                               f"`vlmerge statistics --statistic {name} --checkpoint {checkpoint}`")
        out[name] = load_file(path)
    return out


@dataclasses.dataclass
class Pair:
    """The two (or three) inputs of a merge, checked to be mergeable."""

    text: ModelDir
    mm: ModelDir
    base: ModelDir | None = None
    # {statistic: ({weight name: tensor} of the text model, of the multimodal one)}
    statistics: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = dataclasses.field(
        default_factory=dict)

    @classmethod
    def open(cls, text: str | Path, mm: str | Path, base: str | Path | None = None, *,
             statistics: Sequence[str] = ()) -> Pair:
        """The inputs, checked to be mergeable, with the data statistics `statistics` of each twin."""
        pair = cls(ModelDir(text), ModelDir(mm), ModelDir(base) if base else None)
        check_compatible(pair.text, pair.mm, what="the text and multimodal models")
        if pair.base is not None:
            check_compatible(pair.text, pair.base, what="the text and base models")
        if statistics:
            text_stats, mm_stats = (load_statistics(d.path, statistics) for d in (pair.text, pair.mm))
            pair.statistics = {s: (text_stats[s], mm_stats[s]) for s in statistics}
        return pair

    def inputs(self, name: str) -> TensorInputs:
        """One tensor of each input, in float32 (methods compute in float32 or better)."""
        stats = {s: (t[name], m[name]) for s, (t, m) in self.statistics.items() if name in t and name in m}
        return TensorInputs.twins(
            name, self.text.get(name).float(), self.mm.get(name).float(),
            self.base.get(name).float() if self.base is not None else None, stats,
        )

    def all_inputs(self) -> Iterator[TensorInputs]:
        return (self.inputs(n) for n in self.text.names() if self.text.specs[n][0].is_floating_point)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A method ready to merge a pair: its parameters with whole-model statistics (e.g. TIES
    thresholds) added, and each tensor's α schedule (`vlmerge.merge.schedule`; None: one α)."""

    method: Method
    params: dict[str, Any]
    schedule: list[dict[str, Any]] | None
    layers: int

    def alpha(self, name: str, alpha: float | None) -> float | None:
        return alpha if self.schedule is None else tensor_alpha(name, alpha, self.schedule, self.layers)

    def copies(self, alpha: float) -> str | None:
        """The input every tensor of the merge at α equals bitwise, or None (a schedule: never assumed)."""
        return self.method.copies(alpha, self.params) if self.schedule is None else None

    def record_params(self) -> dict[str, Any]:
        """The parameters a merge record (and a results row) names the merge by."""
        params = {k: v for k, v in self.params.items() if k in self.method.declared}  # not what prepare added
        return params if self.schedule is None else params | {SCHEDULE: self.schedule}


def resolve(method_name: str, params: dict[str, Any], pair: Pair, inputs: Iterable[TensorInputs] | None = None,
            *, allow_extrapolation: bool = False) -> Resolved:
    """The method, its parameters with whole-model statistics added, and the α schedule (params' `schedule`)."""
    method = get_method(method_name)
    if method.merges_experts:
        raise VlmergeError(f"method {method_name} merges the experts of one expert checkpoint, not two models "
                           "(vlmerge merge-experts)")
    if method.needs_base and pair.base is None:
        raise VlmergeError(f"method {method_name} works on task vectors: give the shared initialisation (--base)")
    if SCHEDULE in params and not method.takes_alpha:
        raise VlmergeError(f"method {method_name} takes no α, so no α schedule")
    schedule = check_schedule(params[SCHEDULE], allow_extrapolation) if SCHEDULE in params else None
    full = method.params({k: v for k, v in params.items() if k != SCHEDULE})
    if method.prepare:
        full |= method.prepare(pair.all_inputs() if inputs is None else inputs, full)
    return Resolved(method, full, schedule, num_layers(pair.text.names()))


def _record(resolved: Resolved, alpha: float, pair: Pair, hashes: dict[str, str]) -> dict:
    return {
        "method": resolved.method.name,
        "alpha": alpha,
        "alpha_is": "weight of the text model: θ = α·θ_text + (1−α)·θ_mm for linear",
        "params": resolved.record_params(),
        "inputs": {role: {"path": str(d.path.resolve()), "sha256": hashes[role]}
                   for role, d in (("text", pair.text), ("mm", pair.mm), ("base", pair.base)) if d is not None},
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def merge_to_disk(
    text: str | Path, mm: str | Path, out: str | Path, method_name: str = "linear",
    alphas: Sequence[float | None] = (0.5,),
    *, params: dict[str, Any] | None = None, base: str | Path | None = None, allow_extrapolation: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Merge at every α from one read of the inputs; each output is a complete HF directory.

    Tensors are streamed: memory is about the largest tensor times (inputs + outputs), not the
    model. Outputs that exist with the same merge record are skipped; any other existing
    output is an error, and nothing is written over it.
    """
    alphas = check_alphas(alphas, allow_extrapolation, get_method(method_name))
    outs = merge_outputs(Path(out), alphas)
    _check_out(Path(out))
    remove_stale_temps(*{o.parent for o in outs})  # what merges killed mid-write left
    pair = Pair.open(text, mm, base, statistics=get_method(method_name).statistics)
    resolved = resolve(method_name, params or {}, pair, allow_extrapolation=allow_extrapolation)
    roles = [(role, d) for role, d in (("text", pair.text), ("mm", pair.mm), ("base", pair.base)) if d is not None]
    with ThreadPoolExecutor(len(roles)) as pool:
        # Hash the inputs on the side while merging; the records need the hashes only at the end.
        futures = {role: pool.submit(d.sha256) for role, d in roles}  # hashlib releases the GIL

        def records(alphas_: Sequence[float]) -> list[dict]:
            hashes = {role: f.result() for role, f in futures.items()}
            return [_record(resolved, a, pair, hashes) for a in alphas_]

        todo = [i for i, o in enumerate(outs) if not o.exists()]
        for i, o in enumerate(outs):
            if i not in todo:
                check_same(o, records([alphas[i]])[0])
        if todo:
            try:
                _stream(pair, resolved, [alphas[i] for i in todo], [outs[i] for i in todo], records, progress,
                        Path(out))
            except OSError as e:  # a full disk, a quota: nothing half-written stays
                raise VlmergeError(f"{e.filename or out}: could not write the merge ({e.strerror or e})") from None
    return outs


def _check_out(out: Path) -> None:
    """`--out` must be a folder (or not exist yet) whose parent can be written, before any work."""
    if out.exists() and not out.is_dir():
        raise VlmergeError(f"{out}: --out is a file; expected a folder to write the merged model(s) into")
    check_creatable(out)


def check_same(out: Path, record: dict) -> None:
    """An existing output is fine (skipped) when it is this very merge; anything else is an error."""
    if not same_record(out / RECORD, record, ("method", "alpha", "params", "inputs")):
        raise VlmergeError(f"{out}: exists and is not this merge; remove it or choose another --out")


# Writes into the page cache are most of the work of a multi-α merge: two threads (one a core
# on the development machines) write while the main thread merges the next outputs. At most
# _IN_FLIGHT merged tensors wait for their write, which bounds the memory.
_WRITERS = 2
_IN_FLIGHT = 4


class _Writes:
    """Writes on a thread pool, at most `limit` pending. A method that takes out= merges into one
    of `limit` float32 buffers of the largest tensor's size, reused once its write is done: fresh
    memory for every output would cost a page fault per 4 KiB."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int, size: int):
        self.pool, self.limit = pool, limit
        self.pending: dict[Future, torch.Tensor | None] = {}
        self.free = [torch.empty(size) for _ in range(limit)] if size else []
        self.lent: dict[int, torch.Tensor] = {}  # data pointer of a lent view -> its whole buffer

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 buffer of this shape that no pending write holds."""
        while not self.free:
            self._wait_one()
        base = self.free.pop()
        self.lent[base.data_ptr()] = base
        return base[: numel(shape)].view(shape)

    def submit(self, fn: Callable, *args: Any, holds: torch.Tensor | None = None) -> None:
        """Run fn(*args) on the pool; `holds` (a lent buffer) is free again once it has run."""
        while len(self.pending) >= self.limit:
            self._wait_one()
        self.pending[self.pool.submit(fn, *args)] = None if holds is None else self.lent.pop(holds.data_ptr())

    def finish(self) -> None:
        while self.pending:
            self._wait_one()

    def _wait_one(self) -> None:
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        for f in done:
            base = self.pending.pop(f)
            f.result()  # a failed write stops the merge here
            if base is not None:
                self.free.append(base)


@contextlib.contextmanager
def _threads_beside_writers() -> Iterator[None]:
    """torch's threads, fewer by the writer threads, while streaming: idle OpenMP threads spin,
    and on 2 cores a second merge thread took the CPU that the writers needed (a 11-α linear
    merge: ~5.5 s with 2 threads, ~4.9 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - _WRITERS))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream(pair: Pair, resolved: Resolved, alphas: list[float], outs: list[Path],
            records: Callable[[Sequence[float]], list[dict]], progress: bool, root: Path) -> None:
    specs = pair.text.specs
    method, params = resolved.method, resolved.params
    floats = [n for n in pair.text.names() if specs[n][0].is_floating_point]
    # An output equal to an input bitwise (linear at α = 0 or 1) is copied kernel-side, tensor
    # by tensor, into the same layout as every other output: the same bytes as merging it.
    same = [resolved.copies(a) for a in alphas]
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(_WRITERS) as pool, _threads_beside_writers():
        tmps = [stack.enter_context(atomic_path(out, is_dir=True)) for out in outs]
        writers = [SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"}) for tmp in tmps]
        for w in writers:
            stack.callback(w.release)
        copies = [pool.submit(_copy_all, w, pair, role) for w, role in zip(writers, same) if role]
        merged = [(a, w) for a, w, role in zip(alphas, writers, same) if not role]
        largest = max((numel(specs[n][1]) for n in floats), default=0) if method.takes_out else 0
        writes = _Writes(pool, _IN_FLIGHT, largest)
        names = tqdm(pair.text.names(), desc=f"merge {method.name} ×{len(alphas)}", unit="tensor",
                     disable=not progress, file=sys.stderr)
        for name in names:
            dtype, shape = specs[name]
            if not dtype.is_floating_point:  # integer buffers are copied from the text model
                t = pair.text.get(name)
                for _, w in merged:
                    writes.submit(w.write, name, t)
                continue
            x = pair.inputs(name)  # read (and checked for NaN/Inf) even when every output is a copy
            for a, w in merged:
                out = writes.buffer(shape) if method.takes_out else None
                merged_tensor = method.merge(x, resolved.alpha(name, a), params, out)
                writes.submit(w.write, name, merged_tensor.to(dtype), holds=out)
        writes.finish()
        for f in copies:
            f.result()
        for w, tmp, folder, record in zip(writers, tmps, outs, records(alphas)):
            w.close()
            for f in COPIED:
                if (pair.text.path / f).is_file():
                    shutil.copy2(pair.text.path / f, tmp / f)
            write_json(tmp / RECORD, record)
            _write_recipes(tmp, folder, record, pair, root)


def _write_recipes(tmp: Path, folder: Path, record: dict, pair: Pair, out: Path) -> None:
    """The model card and, where mergekit can express the merge, its recipe, into the merge's temp
    folder `tmp` (the merge appears with them or not at all)."""
    inputs = {role: d for role, d in (("text", pair.text), ("mm", pair.mm), ("base", pair.base)) if d is not None}
    recipe, note = mergekit_yaml(record, inputs, out, folder)
    if recipe is not None:
        write_text(mergekit_recipe(tmp), recipe)
    write_text(model_card(tmp), merge_card(record, pair.text.config, merge_command(record, folder), recipe, note))


def _copy_all(writer: SafetensorsWriter, pair: Pair, role: str) -> None:
    """Every tensor from the input `role`, except integer buffers, which come from the text
    model in every output."""
    source: ModelDir = getattr(pair, role)
    for name, (dtype, _) in pair.text.specs.items():
        writer.copy(name, (source if dtype.is_floating_point else pair.text).span(name))


class PairMerger:
    """The sweep's merger: both models read once onto `device`, every α merged there into one model
    in place (the model lives on the same device)."""

    def __init__(self, pair: Pair, *, allow_extrapolation: bool = False, device: torch.device | str = "cpu"):
        self.pair, self.allow_extrapolation = pair, allow_extrapolation
        names = [n for n in pair.text.names() if pair.text.specs[n][0].is_floating_point]
        self.inputs = {n: pair.inputs(n).to(device) for n in names}
        self._resolved: dict[str, Resolved] = {}

    def merge_into(self, model: torch.nn.Module, method_name: str, alpha: float | None,
                   params: dict | None = None) -> None:
        """Overwrite `model`'s weights with the merge at α (no allocation beyond one tensor)."""
        check_alphas([alpha], self.allow_extrapolation, get_method(method_name))
        key = json.dumps([method_name, params or {}], sort_keys=True)
        if key not in self._resolved:
            self._resolved[key] = resolve(method_name, params or {}, self.pair, self.inputs.values(),
                                          allow_extrapolation=self.allow_extrapolation)
        r = self._resolved[key]
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, x in self.inputs.items():
                state[name].data.copy_(r.method.merge(x, r.alpha(name, alpha), r.params))
