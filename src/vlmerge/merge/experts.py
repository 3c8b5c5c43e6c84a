"""One modality-agnostic model from a modality-expert checkpoint (Sung et al. 2023, §4.1).

`vlmerge merge-experts` reads a checkpoint of `ExpertLlavaForConditionalGeneration` and writes a
checkpoint of the plain model (today's architecture), so that eval, sweep, distances and
analysis take it like any other; the sweep merges it in memory (`ExpertMerger`). The maths are
ordinary merge methods that merge `experts` (`vlmerge.merge.methods.modality_experts`:
experts_interpolation, experts_arithmetic, experts_regmean); this module reads each
expert-specific tensor's experts (W^l, W^v, and W^vl in the top `cross_modal_layers` layers),
W_seed and the per-expert data statistics (Grams) into their inputs.

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
from vlmerge.io import atomic_path, write_json, write_text
from vlmerge.layout import model_card
from vlmerge.merge.core import RECORD, check_same, load_statistics
from vlmerge.merge.io import ModelDir, SafetensorsWriter
from vlmerge.merge.methods import METHODS, Method, TensorInputs, get_method
from vlmerge.merge.recipe import command, merge_card, param_args
from vlmerge.model import (
    CROSS, EXPERT_MODEL_TYPE, LANGUAGE, VISION, ExpertLlavaConfig, PooledLlavaForConditionalGeneration,
    agnostic_config, copy_tokenizer_files, expert_param, expert_param_name,
)
from vlmerge.modelkey import EXPERT_METHOD_PREFIX, expert_distance_run

Setting = tuple[float | None, dict[str, Any]]  # (α, parameters) of one merge; α None for a method without one


def expert_methods() -> list[str]:
    """The registered methods that merge an expert checkpoint's experts."""
    return [name for name, m in METHODS.items() if m.merges_experts]


def expert_method(name: str) -> Method:
    """The expert method `name` (`experts_interpolation`, …); a twins' method is an error."""
    method = get_method(name)
    if not method.merges_experts:
        raise VlmergeError(f"method {name} merges the twins, not the experts of an expert checkpoint "
                           f"(expert methods: {', '.join(expert_methods())})")
    return method


def is_expert_method(name: str) -> bool:
    return name in METHODS and METHODS[name].merges_experts


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
    with the seed weights and the experts' data statistics where the method needs them."""

    src: ModelDir
    method: Method
    seed: ModelDir | None
    statistics: dict[str, dict[str, torch.Tensor]]  # {statistic: {weight name: tensor}}
    groups: dict[str, dict[str | None, str]]

    @classmethod
    def open(cls, checkpoint: str | Path, method: str, seed: str | Path | None = None) -> ExpertInputs:
        spec = expert_method(method)
        src = open_expert_checkpoint(checkpoint)
        if spec.needs_base and seed is None:
            raise VlmergeError(f"merge-experts {method}: give the seed weights (--seed, the seed run's last checkpoint)")
        return cls(src, spec, ModelDir(seed) if spec.needs_base else None,
                   load_statistics(src.path, spec.statistics), expert_groups(src.names()))

    @property
    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each agnostic tensor."""
        return {plain: self.src.specs[next(iter(members.values()))] for plain, members in self.groups.items()}

    def read(self, plain: str) -> torch.Tensor | TensorInputs:
        """A shared tensor as stored, or the inputs of an expert-specific one (experts in float32, W_seed, statistics)."""
        members = self.groups[plain]
        if None in members or not self.src.specs[next(iter(members.values()))][0].is_floating_point:
            return self.src.get(members[next(iter(members))])  # shared: the trained shared weights
        weights = {e: self.src.get(n).float() for e, n in members.items()}
        w_seed = seed_tensor(self.seed, plain) if self.seed is not None else None
        stats = {s: {e: by_name[n] for e, n in members.items()} for s, by_name in self.statistics.items()
                 if all(n in by_name for n in members.values())}
        return TensorInputs(plain, weights, w_seed, stats)

    def merge(self, read: torch.Tensor | TensorInputs, setting: Setting) -> torch.Tensor:
        """The agnostic tensor of one setting from what `read` returned (float32 when merged)."""
        if isinstance(read, torch.Tensor):
            return read
        return self.method.merge(read, *setting)

    def setting(self, alpha: float | None, params: dict[str, Any]) -> Setting:
        """(α, the parameters with their defaults) of one merge, checked against the method."""
        if (alpha is None) == self.method.takes_alpha:
            raise VlmergeError(f"merge-experts {self.method.name}: " + ("needs an α" if alpha is None else "takes no α"))
        return alpha, self.method.params(params)


def merge_experts(checkpoint: str | Path, outs: Sequence[Path], method: str, settings: Sequence[Setting],
                  *, seed: str | Path | None = None) -> list[Path]:
    """Write one agnostic checkpoint per (α, parameters) setting, reading the expert checkpoint once.
    An output that exists as this very merge is skipped; any other is an error."""
    x = ExpertInputs.open(checkpoint, method, seed)
    settings = [x.setting(*s) for s in settings]
    records = [_record(x.method, s, x.src, x.seed) for s in settings]
    todo = []
    for out, setting, record in zip(outs, settings, records):
        if out.exists():
            check_same(out, record)
        else:
            todo.append((out, setting, record))
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
            for w, (_, setting, _) in zip(writers, todo):
                w.write(plain, x.merge(read, setting).to(dtype))
        for w, tmp, (out, _, record) in zip(writers, tmps, todo):
            w.close()
            with quiet_transformers():
                config.save_pretrained(tmp)
            copy_tokenizer_files(x.src.path, tmp)
            write_json(tmp / RECORD, record)
            write_text(model_card(tmp), merge_card(record, config.to_dict(), _command(record, out), None, NO_RECIPE))
    return list(outs)


class ExpertMerger:
    """The sweep's merger of an expert checkpoint: read once onto `device`, each setting merged
    there into one plain (agnostic) model in place."""

    def __init__(self, checkpoint: str | Path, method: str, seed: str | Path | None = None, *,
                 device: torch.device | str = "cpu"):
        self.x = ExpertInputs.open(checkpoint, method, seed)
        self.inputs = {plain: self.x.read(plain).to(device) for plain in self.x.groups}

    def plain_model(self) -> PooledLlavaForConditionalGeneration:
        """An agnostic model of the checkpoint's shape (its weights are set by `merge_into`)."""
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            return PooledLlavaForConditionalGeneration(agnostic_config(ExpertLlavaConfig.from_dict(self.x.src.config)))

    def merge_into(self, model: torch.nn.Module, alpha: float | None, params: dict[str, Any]) -> None:
        """Overwrite every weight of `model` with the merge at α (None: a method without α) and `params`."""
        setting = self.x.setting(alpha, params)
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for plain, read in self.inputs.items():
                state[plain].data.copy_(self.x.merge(read, setting))


NO_RECIPE = ("No mergekit recipe: mergekit has no merge of the modality experts inside one checkpoint "
             "(`vlmerge merge-experts`).")


def _command(record: dict, out: Path) -> str:
    """The `vlmerge merge-experts` command that makes this merge (into `out`)."""
    argv = ["vlmerge", "merge-experts", "--checkpoint", record["inputs"]["text"]["path"],
            "--method", record["method"].removeprefix(EXPERT_METHOD_PREFIX)]
    if record["alpha"] is not None:
        argv += ["--alpha", repr(record["alpha"])]
    if "base" in record["inputs"]:
        argv += ["--seed", record["inputs"]["base"]["path"]]
    return command([*argv, *param_args(record["params"]), "--out", str(out)])


def _record(method: Method, setting: Setting, src: ModelDir, seed: ModelDir | None) -> dict:
    """The merge record: the expert checkpoint is both the "text" (language) and "mm" (vision) input."""
    inputs = {"path": str(src.path.resolve()), "sha256": src.sha256()}
    record_inputs = {"text": inputs, "mm": inputs}
    if seed is not None:
        record_inputs["base"] = {"path": str(seed.path.resolve()), "sha256": seed.sha256()}
    alpha, params = setting
    return {
        "method": method.name,
        "alpha": alpha,
        "alpha_is": "weight of the vision expert: W = α·W^v + (1−α)·W^l (Sung et al. 2023)",
        "params": params,
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
