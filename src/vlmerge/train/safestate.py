"""Training state (optimizer, scheduler, counters, RNG) as JSON + safetensors: nothing is unpickled on resume.

A state tree (dicts, lists, tuples, numbers, strings, tensors, enums and plain objects such as
DeepSpeed's loss scaler) is written as a JSON skeleton whose tensors live in a safetensors file.
Reading never builds an object from a name in the file: enums, named tuples and objects are
restored into the live engine's own instances (the *template*), so a crafted file can at most
hold wrong numbers, never run code.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, write_json
from vlmerge.layout import state_part_files

_PRIMITIVES = (bool, int, float, str, type(None))


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able skeleton of `obj`; its tensors are added to `tensors` under the keys it names."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share storage.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, enum.Enum):
        return encode(obj.value, tensors)
    if isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, tuple):
        return {"tuple": [encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state dict with keys of type {sorted({type(k).__name__ for k in obj})}")
        return {"dict": [[k, encode(v, tensors)] for k, v in obj.items()]}
    if hasattr(obj, "__dict__"):
        return {"object": type(obj).__qualname__, "attrs": {k: encode(v, tensors) for k, v in vars(obj).items()}}
    raise TypeError(f"cannot save training state of type {type(obj).__name__}")


def decode(node: Any, tensors: dict[str, torch.Tensor], template: Any = None, where: str = "") -> Any:
    """The value `encode` described, with enums, named tuples and objects restored into `template`'s."""
    if isinstance(node, _PRIMITIVES):
        return type(template)(node) if isinstance(template, enum.Enum) else node
    if isinstance(node, list):
        kids = template if isinstance(template, list) else []
        return [decode(x, tensors, kids[i] if i < len(kids) else None, f"{where}[{i}]") for i, x in enumerate(node)]
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError(f"{where or 'top'}: unexpected node {str(node)[:40]!r}")
    if "tensor" in node:
        if node["tensor"] not in tensors:
            raise ValueError(f"{where}: tensor {node['tensor']!r} missing")
        return tensors[node["tensor"]]
    if "tuple" in node:
        kids = template if isinstance(template, tuple) else ()
        items = [decode(x, tensors, kids[i] if i < len(kids) else None, f"{where}[{i}]")
                 for i, x in enumerate(node["tuple"])]
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    if "dict" in node:
        kids = template if isinstance(template, dict) else {}
        return {k: decode(v, tensors, kids.get(k), f"{where}.{k}") for k, v in node["dict"]}
    if "object" in node:
        # Never built from its name: only the live engine's own instance is updated.
        if type(template).__qualname__ != node["object"]:
            raise ValueError(f"{where}: a {node['object']} where this engine has {type(template).__name__}")
        for k, v in node["attrs"].items():
            if k not in vars(template):  # only the values the engine's object already has
                raise ValueError(f"{where}: {node['object']} has no attribute {k!r}")
            setattr(template, k, decode(v, tensors, vars(template)[k], f"{where}.{k}"))
        return template
    raise ValueError(f"{where or 'top'}: unexpected node {str(node)[:40]!r}")


def save_state(folder: Path, name: str, obj: Any) -> None:
    """Write `obj` as `<name>.json` + `<name>.safetensors` in `folder`, each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(obj, tensors)
    skeleton_path, tensors_path = state_part_files(folder, name)
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp))
    write_json(skeleton_path, skeleton)


def load_state(folder: Path, name: str, template: Any = None) -> Any:
    """Read state `name` of `folder` (see `save_state`), or raise a one-line error naming the file."""
    skeleton_path, tensors_path = state_part_files(folder, name)
    for path in (skeleton_path, tensors_path):
        if not path.is_file():
            raise VlmergeError(f"{path}: training state file missing (expected the pickle-free state that "
                               f"vlmerge writes; remove {folder.parent} to train the run again from its start)")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VlmergeError(f"{tensors_path}: not a readable safetensors file ({e})") from None
    try:
        with open(skeleton_path, encoding="utf-8") as f:
            skeleton = json.load(f)
        return decode(skeleton, tensors, template)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise VlmergeError(f"{skeleton_path}: not a training state written by vlmerge ({e})") from None


def rng_state() -> dict[str, Any]:
    """Torch's random generators (CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

