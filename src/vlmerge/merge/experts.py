"""One modality-agnostic model from a modality-expert checkpoint (Sung et al. 2023, §4.1).

`vlmerge merge-experts` reads a checkpoint of `ExpertLlavaForConditionalGeneration` and writes a
checkpoint of the plain model (today's architecture), so that eval, sweep, distances and
analysis take it like any other. Per expert-specific tensor, with W^v, W^l (and W^vl in the
top `cross_modal_layers` layers):

    interpolation   α·W^v + (1−α)·W^l;  ⅔(α·W^v + (1−α)·W^l) + ⅓·W^vl where W^vl exists
    arithmetic      W_seed + λ·Σ_m (W^m − W_seed)            (W_seed: the seed run's weights)
    regmean         per linear layer, RegMean over the experts with the Grams of the tokens
                    routed to each, weighted as interpolation; other tensors interpolated

α is the weight of the VISION expert, as in Sung et al. (the twins' α weights the text model).
Shared tensors (embeddings, projector, LM head, shared modules) are copied: the token embedding
and the projector already are the language and vision embeddings, kept apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlmerge import code_version
from vlmerge.errors import VlmergeError
from vlmerge.hf import quiet_transformers
from vlmerge.io import atomic_path, write_json
from vlmerge.merge.core import RECORD, check_same, load_grams
from vlmerge.merge.io import ModelDir, SafetensorsWriter
from vlmerge.merge.methods.regmean import regmean_weight
from vlmerge.model import (
    CROSS, EXPERT_MODEL_TYPE, LANGUAGE, VISION, ExpertLlavaConfig, PooledLlavaForConditionalGeneration,
    agnostic_config, copy_tokenizer_files, expert_param, expert_param_name,
)
from vlmerge.modelkey import EXPERT_METHOD_PREFIX, expert_distance_run
from vlmerge.registry import Registry, with_defaults

PREFIX = EXPERT_METHOD_PREFIX  # the results' method column: experts_interpolation, … (apart from the twins' methods)


@dataclasses.dataclass(frozen=True)
class ExpertMethod:
    name: str
    defaults: dict[str, float]
    needs_seed: bool = False
    needs_grams: bool = False

    def params(self, given: dict[str, Any]) -> dict[str, float]:
        """The defaults overridden by `given`; an unknown parameter is an error."""
        return {k: float(v) for k, v in with_defaults(f"merge-experts {self.name}", self.defaults, given).items()}


METHODS: Registry[ExpertMethod] = Registry("expert merge method")
for _m in (ExpertMethod("interpolation", {"alpha": 0.5}),
           ExpertMethod("arithmetic", {"lam": 0.5}, needs_seed=True),
           ExpertMethod("regmean", {"alpha": 0.5, "gamma": 0.9}, needs_grams=True)):
    METHODS.add(_m.name, _m)


def expert_method(name: str) -> ExpertMethod | None:
    """The expert method that a sweep or results method name `experts_<method>` stands for; None
    for the twins' methods."""
    return METHODS.lookup(name.removeprefix(PREFIX)) if name.startswith(PREFIX) else None


# -- the maths, per tensor ----------------------------------------------------------------------

def coefficients(alpha: float, experts: Sequence[str]) -> dict[str, float]:
    """Each expert's weight: α (vision), 1−α (language); ⅔ of those and ⅓ (cross-modal) where it exists."""
    c = {VISION: alpha, LANGUAGE: 1.0 - alpha}
    if CROSS in experts:
        c = {k: 2.0 / 3.0 * v for k, v in c.items()} | {CROSS: 1.0 / 3.0}
    return c


def interpolate(weights: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    c = coefficients(alpha, list(weights))
    return sum(c[e] * w for e, w in weights.items())


def modality_arithmetic(weights: dict[str, torch.Tensor], seed: torch.Tensor, lam: float) -> torch.Tensor:
    """W_seed + λ·Σ_m (W^m − W_seed)."""
    return seed + lam * sum(w - seed for w in weights.values())


def regmean_experts(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], alpha: float,
                    gamma: float) -> torch.Tensor:
    """RegMean over the experts of one linear layer, each weighted as in `interpolate`."""
    c = coefficients(alpha, list(weights))
    names = list(weights)
    return regmean_weight([weights[e] for e in names], [grams[e] for e in names], [c[e] for e in names], gamma)


def merge_tensor(method: str, params: dict[str, float], weights: dict[str, torch.Tensor],
                 seed: torch.Tensor | None = None, grams: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One agnostic tensor from its experts' tensors (float32 or better)."""
    if method == "arithmetic":
        return modality_arithmetic(weights, seed, params["lam"])
    if method == "regmean" and grams is not None:
        return regmean_experts(weights, grams, params["alpha"], params["gamma"])
    return interpolate(weights, params["alpha"])  # regmean: tensors without Grams (norms) too


# -- checkpoints ---------------------------------------------------------------------------------

def expert_groups(names: Sequence[str]) -> dict[str, dict[str | None, str]]:
    """Agnostic tensor name -> {expert (None: shared): tensor name in the expert checkpoint}."""
    groups: dict[str, dict[str | None, str]] = {}
    for name in names:
        plain, expert = expert_param(name)
        groups.setdefault(plain, {})[expert] = name
    return groups


def open_expert_checkpoint(path: str | Path) -> ModelDir:
    model = ModelDir(path)
    if model.config.get("model_type") != EXPERT_MODEL_TYPE:
        raise VlmergeError(f"{path}: model_type is {model.config.get('model_type')!r}, expected "
                           f"{EXPERT_MODEL_TYPE!r} (a checkpoint of the expert run)")
    return model


def seed_tensor(seed: ModelDir, plain: str) -> torch.Tensor:
    """W_seed of one tensor: from an agnostic model, or any expert of an expert model's initialisation."""
    if plain in seed.specs:
        return seed.get(plain).float()
    name = expert_param_name(plain, LANGUAGE)
    if name not in seed.specs:
        raise VlmergeError(f"{seed.path}: no tensor {plain!r} (the seed must be the expert run's initialisation)")
    return seed.get(name).float()


@dataclasses.dataclass
class ExpertInputs:
    """An expert checkpoint opened for one method: its tensors grouped under the agnostic names,
    with the seed weights and the experts' Grams where the method needs them."""

    src: ModelDir
    method: ExpertMethod
    seed: ModelDir | None
    grams: dict[str, torch.Tensor] | None
    groups: dict[str, dict[str | None, str]]

    @classmethod
    def open(cls, checkpoint: str | Path, method: str, seed: str | Path | None = None) -> ExpertInputs:
        spec = METHODS.lookup(method)
        src = open_expert_checkpoint(checkpoint)
        if spec.needs_seed and seed is None:
            raise VlmergeError(f"merge-experts {method}: give the seed weights (--seed, the seed run's last checkpoint)")
        return cls(src, spec, ModelDir(seed) if spec.needs_seed else None,
                   load_grams(src.path) if spec.needs_grams else None, expert_groups(src.names()))

    @property
    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each agnostic tensor."""
        return {plain: self.src.specs[next(iter(members.values()))] for plain, members in self.groups.items()}

    def read(self, plain: str) -> torch.Tensor | tuple:
        """A shared tensor as stored, or (expert weights in float32, W_seed, Grams) of an expert-specific one."""
        members = self.groups[plain]
        if None in members or not self.src.specs[next(iter(members.values()))][0].is_floating_point:
            return self.src.get(members[next(iter(members))])  # shared: the trained shared weights
        weights = {e: self.src.get(n).float() for e, n in members.items()}
        w_seed = seed_tensor(self.seed, plain) if self.seed is not None else None
        grams = None
        if self.grams is not None and all(n in self.grams for n in members.values()):
            grams = {e: self.grams[n] for e, n in members.items()}
        return weights, w_seed, grams

    def merge(self, read: torch.Tensor | tuple, params: dict[str, float]) -> torch.Tensor:
        """The agnostic tensor of one setting from what `read` returned (float32 when merged)."""
        if isinstance(read, torch.Tensor):
            return read
        return merge_tensor(self.method.name, params, *read)


def merge_experts(checkpoint: str | Path, outs: Sequence[Path], method: str, settings: Sequence[dict[str, Any]],
                  *, seed: str | Path | None = None) -> list[Path]:
    """Write one agnostic checkpoint per parameter setting, reading the expert checkpoint once.
    An output that exists as this very merge is skipped; any other is an error."""
    x = ExpertInputs.open(checkpoint, method, seed)
    settings = [x.method.params(s) for s in settings]
    records = [_record(x.method, p, x.src, x.seed) for p in settings]
    todo = []
    for out, params, record in zip(outs, settings, records):
        if out.exists():
            check_same(out, record)
        else:
            todo.append((out, params, record))
    if not todo:
        return list(outs)
    specs = x.specs
    config = agnostic_config(ExpertLlavaConfig.from_dict(x.src.config))
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(out, is_dir=True)) for out, _, _ in todo]
        writers = [SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"}) for tmp in tmps]
        for w in writers:
            stack.callback(w.release)
        for plain, (dtype, _) in specs.items():
            read = x.read(plain)
            for w, (_, params, _) in zip(writers, todo):
                w.write(plain, x.merge(read, params).to(dtype))
        for w, tmp, (_, _, record) in zip(writers, tmps, todo):
            w.close()
            with quiet_transformers():
                config.save_pretrained(tmp)
            copy_tokenizer_files(x.src.path, tmp)
            write_json(tmp / RECORD, record)
    return list(outs)


class ExpertMerger:
    """The sweep's merger of an expert checkpoint: read once onto `device`, each setting merged
    there into one plain (agnostic) model in place."""

    def __init__(self, checkpoint: str | Path, method: str, seed: str | Path | None = None, *,
                 device: torch.device | str = "cpu"):
        self.x = ExpertInputs.open(checkpoint, method, seed)
        self.inputs = {plain: _on(device, self.x.read(plain)) for plain in self.x.groups}

    def plain_model(self) -> PooledLlavaForConditionalGeneration:
        """An agnostic model of the checkpoint's shape (its weights are set by `merge_into`)."""
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            return PooledLlavaForConditionalGeneration(agnostic_config(ExpertLlavaConfig.from_dict(self.x.src.config)))

    def merge_into(self, model: torch.nn.Module, params: dict[str, Any]) -> None:
        """Overwrite every weight of `model` with the merge of this setting."""
        full = self.x.method.params(params)
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for plain, read in self.inputs.items():
                state[plain].data.copy_(self.x.merge(read, full))


def _on(device: torch.device | str, read: Any) -> Any:
    """What `ExpertInputs.read` returned, its tensors moved to `device`."""
    if isinstance(read, torch.Tensor):
        return read.to(device)
    if isinstance(read, tuple):
        return tuple(_on(device, x) for x in read)
    if isinstance(read, dict):
        return {k: _on(device, v) for k, v in read.items()}
    return read


def _record(spec: ExpertMethod, params: dict[str, float], src: ModelDir, seed: ModelDir | None) -> dict:
    """The merge record: the expert checkpoint is both the "text" (language) and "mm" (vision) input."""
    inputs = {"path": str(src.path.resolve()), "sha256": src.sha256()}
    record_inputs = {"text": inputs, "mm": inputs}
    if seed is not None:
        record_inputs["base"] = {"path": str(seed.path.resolve()), "sha256": seed.sha256()}
    return {
        "method": PREFIX + spec.name,
        "alpha": params.get("alpha"),
        "alpha_is": "weight of the vision expert: W = α·W^v + (1−α)·W^l (Sung et al. 2023)",
        "params": {k: v for k, v in params.items() if k != "alpha"},
        "inputs": record_inputs,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- distances between the experts (Sung et al. §7) -----------------------------------------------

class ExpertView:
    """One expert's tensors of an expert checkpoint under the agnostic names (what `distances` reads
    of a `ModelDir`); expert None: an agnostic model's (the seed's) tensors of the same names."""

    def __init__(self, src: ModelDir, expert: str | None, plains: Sequence[str]):
        self.path, self.architecture, self._src = src.path, "experts", src
        self._names = {p: p if expert is None else expert_param_name(p, expert) for p in plains}
        self.specs = {p: src.specs[n] for p, n in self._names.items()}

    def names(self) -> list[str]:
        return list(self.specs)

    def get(self, name: str) -> torch.Tensor:
        return self._src.get(self._names[name])


EXPERT_PAIRS = ((LANGUAGE, VISION), (LANGUAGE, CROSS), (VISION, CROSS))


def expert_distance_rows(checkpoint: str | Path, seed: str | Path | None = None, *, per_layer: bool = True,
                         device: torch.device | str = "cpu"):
    """Distance rows between W^l and W^v (and each with W^vl) over the expert-specific tensors,
    `text_run`/`mm_run` naming the two experts (`experts:language`, …); with the seed weights,
    also between their task vectors."""
    import pandas as pd

    from vlmerge.merge.distance import distance_rows

    src = open_expert_checkpoint(checkpoint)
    groups = {p: m for p, m in expert_groups(src.names()).items() if None not in m}
    base_dir = ModelDir(seed) if seed is not None else None
    frames = []
    for a, b in EXPERT_PAIRS:
        plains = [p for p, m in groups.items() if a in m and b in m]
        if not plains:
            continue
        base = None
        if base_dir is not None:
            base = ExpertView(base_dir, None if plains[0] in base_dir.specs else LANGUAGE, plains)
        rows = distance_rows(ExpertView(src, a, plains), ExpertView(src, b, plains), base, per_layer=per_layer,
                             device=device)
        frames.append(rows.assign(text_run=expert_distance_run(a), mm_run=expert_distance_run(b)))
    return pd.concat(frames, ignore_index=True)
