"""A merge as recipes a peer can read, and mergekit's recipes read as merges.

Beside every merge it writes, `vlmerge merge` leaves (`vlmerge.merge.core`):

- `README.md`, the model card (`merge_card`): the method, α and parameters, the inputs with the sha256
  of their weights, the architecture, and how to make the merge again;
- `mergekit.yaml` where mergekit can express the merge (`mergekit_yaml`): `mergekit-yaml` run on it
  reproduces the merge's language model (for our image-taking checkpoints, `vlmerge export-text` of
  the merge; the projector is vlmerge's alone) to float32 rounding. mergekit reads text models only:
  the recipe names each image-taking input by its exported language model
  (`layout.mergekit_text_model`), and its comments give the `vlmerge export-text` commands.

Both directions share one table (`SHARED`): models[0] is the text model with weight α and models[1]
the multimodal one with 1 − α (`parts.ROLES`), base_model the shared initialisation of the
task-vector methods; slerp has base_model the multimodal model and t = α. `read_recipe` reads
mergekit's YAML (ours, or a user's) into a merge of ours, `vlmerge merge --recipe FILE`.

The random methods (DARE, DELLA) draw their masks from one generator per seed, input and tensor
(`parts.uniforms`); mergekit draws with `torch.bernoulli` on its global generator. A recipe gives
mergekit the method and its parameters, not our masks: its merge is another draw of the same method.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import textwrap
from pathlib import Path
from typing import Any

import torch
import yaml

from vlmerge.card import architecture, render
from vlmerge.errors import VlmergeError
from vlmerge.hf import EXPERT_MODEL_TYPE, MODEL_TYPE
from vlmerge.layout import mergekit_recipe, mergekit_text_model
from vlmerge.merge.io import ModelDir
from vlmerge.merge.methods import get_method
from vlmerge.merge.schedule import SCHEDULE

MERGEKIT_LERP_ABOVE = 0.9995  # mergekit's slerp interpolates linearly where |cos| exceeds this (its dot_threshold)
SLERP_EPS = round(1 - MERGEKIT_LERP_ABOVE, 12)  # our slerp's eps with the same rule
RENAMED = {"lam": "lambda"}  # our parameter -> mergekit's
NO_KEY = ("seed",)  # our parameters that mergekit has no key for: its draw is its own


@dataclasses.dataclass(frozen=True)
class Shared:
    """One of our methods as one of mergekit's: mergekit's parameters with their defaults (shared by the
    models, or each model's own), and the values our method behaves as for those it does not declare."""

    mergekit: str
    shared: dict[str, Any]
    per_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: bool = True  # each model's `weight`: α (text) and 1 − α (mm)
    base: bool = True  # base_model is the shared initialisation
    implied: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # mergekit's parameters that do not change this method's result
    consensus: bool = False  # TIES's sign election: normalize divides by the agreeing weights alone


def _task_arithmetic(name: str, normalize: bool, rescale: bool, *, per_model: dict | None = None,
                     implied: dict | None = None, ignored: tuple[str, ...] = ()) -> Shared:
    """A method of mergekit's generalized task arithmetic (its parameters and their defaults)."""
    return Shared(name, {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
                  {"density": 1.0} | (per_model or {}), implied=implied or {}, ignored=("int8_mask", *ignored),
                  consensus=name.endswith("ties") or name == "della")


SHARED: dict[str, Shared] = {
    "linear": Shared("linear", {"normalize": True}, base=False, implied={"normalize": True}),
    "slerp": Shared("slerp", {"t": None}, weights=False, base=False),
    "task_arithmetic": _task_arithmetic("task_arithmetic", False, False, implied={"normalize": False},
                                        ignored=("rescale", "density")),  # nothing sparsified
    "ties": _task_arithmetic("ties", True, False, implied={"normalize": True, "rescale": False, "scope": "tensor"}),
    "dare_linear": _task_arithmetic("dare_linear", False, True, implied={"normalize": False}),
    "dare_ties": _task_arithmetic("dare_ties", False, True),
    "breadcrumbs": _task_arithmetic("breadcrumbs", False, False, per_model={"gamma": 0.01},
                                    implied={"normalize": False}),
    "breadcrumbs_ties": _task_arithmetic("breadcrumbs_ties", False, False, per_model={"gamma": 0.01}),
    "della": _task_arithmetic("della", True, True, per_model={"epsilon": 0.15}),
    "della_linear": _task_arithmetic("della_linear", False, True, per_model={"epsilon": 0.15},
                                     implied={"normalize": False}),
}
# Our `dare` (the paper's: survivors × 1/(1−p)) is mergekit's dare_linear without its L1 rescaling,
# keeping each entry with probability 1 − p, the 1/(1−p) in the weights.
SHARED["dare"] = SHARED["dare_linear"]


# -- writing ---------------------------------------------------------------------------------------

def _mergekit_form(method: str, params: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    """(our method that is mergekit's as it stands, its parameters, the weights' scale) of one of our merges."""
    if method == "dare":  # DARE's 1/(1−p) goes into the weights: mergekit rescales by the L1 norm or not at all
        keep = 1 - params["p"]
        return "dare_linear", {"density": keep, "rescale": False, "lam": params["lam"], "seed": params["seed"]}, 1 / keep
    return method, params, 1.0


def _why_not(method: str, params: dict[str, Any]) -> str | None:
    """Why mergekit cannot express this merge (one sentence), or None."""
    if method not in SHARED:
        return f"mergekit has no method that computes vlmerge's `{method}`"
    if SCHEDULE in params:
        return "an α schedule (per layer or module) is not written as a mergekit recipe"
    if params.get("scope") == "model":
        return ("ties with scope=model trims by one threshold over the whole model; mergekit's ties trims "
                "each tensor (scope=tensor)")
    if method == "slerp" and params["eps"] != SLERP_EPS:
        return (f"mergekit's slerp interpolates linearly where |cos| > {MERGEKIT_LERP_ABOVE}, this merge where "
                f"|cos| > 1 − eps = {1 - params['eps']:g}: merge with --param eps={SLERP_EPS:g} for a merge that "
                "mergekit reproduces")
    return None


def _input_model(d: ModelDir, role: str, out: Path) -> tuple[Path | None, str | None]:
    """The model mergekit reads for one input (the input itself, or its exported language model) and
    the `vlmerge export-text` command that writes it; (None, why) where there is none."""
    model_type = d.config.get("model_type")
    if model_type == EXPERT_MODEL_TYPE:
        return None, f"{d.path} is a modality-expert checkpoint, which neither mergekit nor export-text reads"
    if model_type == MODEL_TYPE:
        exported = mergekit_text_model(out, role)
        return exported, command(["vlmerge", "export-text", str(d.path.resolve()), str(exported)])
    return d.path.resolve(), None


def mergekit_yaml(record: dict, inputs: dict[str, ModelDir], out: Path, folder: Path) -> tuple[str | None, str]:
    """mergekit's YAML of one merge of `vlmerge merge` (None where mergekit cannot express it) and a note
    for the card: why there is none, or what to know to run it. `inputs`: the merge's models by role,
    `out`: its --out, `folder`: the merge's own folder."""
    method, alpha, params = record["method"], record["alpha"], record["params"]
    reason = _why_not(method, params)
    dtypes = {spec[0] for spec in inputs["text"].specs.values() if spec[0].is_floating_point}
    if reason is None and len(dtypes) != 1:
        reason = "the weights mix several floating-point types, and mergekit writes one (out_dtype)"
    models, exports = {}, []
    for role, d in inputs.items():
        if reason is None:
            models[role], export = _input_model(d, role, out.resolve())
            if models[role] is None:
                reason = export
            elif export:
                exports.append(export)
    if reason is not None:
        return None, f"No mergekit recipe: {reason}."
    as_mergekit, ours, scale = _mergekit_form(method, params)
    shared, declared = SHARED[as_mergekit], get_method(as_mergekit).declared
    top = {k: v for k, v in shared.implied.items() if k in shared.shared}
    top |= {RENAMED.get(k, k): v for k, v in ours.items() if k not in shared.per_model and k not in NO_KEY
            and RENAMED.get(k, k) in shared.shared}
    own = {k: ours[k] for k in shared.per_model if k in ours and k in declared}
    cfg: dict[str, Any] = {"merge_method": shared.mergekit}
    if method == "slerp":  # t = 0 is base_model: the multimodal model
        cfg["base_model"] = str(models["mm"])
        top = {"t": alpha}
    elif shared.base:
        cfg["base_model"] = str(models["base"])
    weights = {"text": alpha * scale, "mm": (1 - alpha) * scale} if shared.weights else {}
    cfg["models"] = [{"model": str(models[r]), "parameters": ({"weight": weights[r]} if weights else {}) | own}
                     for r in ("text", "mm")]
    if top:
        cfg["parameters"] = top
    cfg |= {"dtype": "float32", "out_dtype": _dtype_name(dtypes.pop())}
    note = _random_note(params) if "seed" in ours else ""
    head = [f"mergekit's recipe of the vlmerge merge in {folder.resolve()}: {method} at α = {alpha}"
            f"{'' if method == 'slerp' else ', the weight of models[0], the text model'}; models[1] is the multimodal "
            "model.",
            *(["mergekit reads text models: first export the language models of the inputs:",
               *(f"  {c}" for c in exports)] if exports else []),
            f"Then: {command(['mergekit-yaml', str(mergekit_recipe(folder).resolve()), 'OUT'])}",
            "OUT then holds this merge's language model" + (" (`vlmerge export-text` of the merge; the projector "
                                                            "is merged by vlmerge alone)" if exports else "")
            + " to float32 rounding" + (f" {note}" if note else ".")]
    text = "\n".join(f"# {line}" for line in _wrap(head)) + "\n" + yaml.safe_dump(cfg, sort_keys=False)
    return text, (f"mergekit reproduces the language model of this merge with `{mergekit_recipe(folder).name}` "
                  "(beside this card)"
                  + (", once the inputs' language models are exported," if exports else "") + " to float32 rounding"
                  + (f" {note}" if note else "."))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random_note(params: dict[str, Any]) -> str:
    return (f"given the same masks: vlmerge drew them with seed {params['seed']} (one generator per seed, input "
            "and tensor), mergekit draws its own (torch.bernoulli on its global generator, mergekit-yaml "
            "--random-seed N), so its merge is another draw of the same method, not these weights.")


def _wrap(lines: list[str], width: int = 110) -> list[str]:
    """Sentences wrapped to `width`; an indented line (a command) stays whole."""
    return [part for line in lines for part in
            ([line] if line.startswith(" ") else textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False))]


# -- the card --------------------------------------------------------------------------------------

def merge_card(record: dict, config: dict[str, Any], command: str, recipe: str | None, note: str) -> str:
    """The model card of a merge: its record (`merge.json`), the architecture, the command that makes it
    again, and mergekit's recipe (or why there is none)."""
    method, alpha, params = record["method"], record["alpha"], record["params"]
    by_path: dict[str, tuple[list[str], str]] = {}
    for role, i in record["inputs"].items():
        by_path.setdefault(i["path"], ([], i["sha256"]))[0].append(role)
    inputs = "\n".join(["| input | path | sha256 of the weights |", "|---|---|---|"]
                       + [f"| {', '.join(roles)} | `{path}` | `{sha}` |" for path, (roles, sha) in by_path.items()])
    shown = "\n".join(f"- `{k}`: `{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}`"
                      for k, v in params.items()) or "- none"
    merge = (f"- method: `{method}`\n- α: {alpha if alpha is not None else 'none (the method takes no α)'}"
             + (f" ({record['alpha_is']})" if alpha is not None else "")
             + f"\n- parameters:\n{_indent(shown)}\n- made by vlmerge {record['code_version']} on {record['created_at']}")
    again = f"With vlmerge:\n\n```bash\n{command}\n```\n\n{note}"
    if recipe is not None:
        again += f"\n\n```yaml\n{recipe.rstrip()}\n```"
    title = f"{method} merge" + (f" at α = {alpha}" if alpha is not None else "")
    return render(title, [("Merge", merge), ("Inputs", inputs), ("Architecture", architecture(config)),
                          ("Make it again", again)],
                  tags=["vlmerge", "merge", method, *(["mergekit"] if recipe is not None else [])],
                  base_model=list(by_path))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def merge_command(record: dict, out: Path) -> str:
    """The `vlmerge merge` command that makes this merge (into `out`)."""
    argv = ["vlmerge", "merge", "--text", record["inputs"]["text"]["path"], "--mm", record["inputs"]["mm"]["path"]]
    if "base" in record["inputs"]:
        argv += ["--base", record["inputs"]["base"]["path"]]
    argv += ["--method", record["method"]]
    if record["alpha"] is not None:
        argv += ["--alpha", repr(record["alpha"])]
    return command([*argv, *param_args(record["params"]), "--out", str(out)])


def param_args(params: dict[str, Any]) -> list[str]:
    """`--param NAME=VALUE` for each parameter, the value as YAML that the command line reads back."""
    out = []
    for k, v in params.items():
        out += ["--param", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def command(argv: list[str]) -> str:
    """A command line a shell runs as these words."""
    return " ".join(shlex.quote(a) for a in argv)


# -- reading ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """A merge of ours read from mergekit's YAML."""

    text: Path
    mm: Path
    base: Path | None
    method: str
    alpha: float | None
    params: dict[str, Any]


KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype")
_REFUSED = {
    "slices": "vlmerge merges whole models (models:), not slices",
    "modules": "vlmerge merges whole models (models:), not modules",
    "tokenizer_source": "vlmerge copies the text model's tokenizer; leave it out",
    "tokenizer": "vlmerge copies the text model's tokenizer; leave it out",
    "chat_template": "vlmerge copies the text model's tokenizer files as they are; leave it out",
}
# mergekit's method -> ours ("dare" is written as dare_linear, which reads back as our dare_linear)
_FROM_MERGEKIT = {s.mergekit: ours for ours, s in SHARED.items() if ours != "dare"}


def read_recipe(path: Path) -> Recipe:
    """mergekit's YAML as one of our merges; a one-line error naming the file and the key otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmergeError(f"--recipe {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise VlmergeError(f"{path}: not a text file ({e.__class__.__name__}); expected mergekit's YAML") from None
    except yaml.YAMLError as e:
        raise VlmergeError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise VlmergeError(f"{path}: expected mergekit's YAML recipe (a mapping with merge_method and models)")
    for key in raw:
        if key in _REFUSED:
            raise VlmergeError(f"{path}: {key}: {_REFUSED[key]}")
        if key not in KEYS:
            raise VlmergeError(f"{path}: {key}: not a key of mergekit's recipe that vlmerge reads "
                               f"(expected {', '.join(KEYS)})")
    name = raw.get("merge_method")
    if name not in _FROM_MERGEKIT:
        raise VlmergeError(f"{path}: merge_method: {name!r}: not one of the methods vlmerge shares with mergekit "
                           f"({', '.join(_FROM_MERGEKIT)})")
    method = _FROM_MERGEKIT[name]
    shared = SHARED[method]
    if raw.get("dtype", "float32") != "float32":
        raise VlmergeError(f"{path}: dtype: {raw['dtype']!r}: vlmerge merges in float32 (leave dtype out or set float32)")
    base = _model_path(path, "base_model", raw.get("base_model")) if raw.get("base_model") is not None else None
    if method == "slerp":  # base_model is one of the two models: t = 0 gives it, the multimodal model
        entries = _models(path, raw.get("models"), None)
        if base is None or sum(e[1].resolve() == base.resolve() for e in entries) != 1:
            raise VlmergeError(f"{path}: base_model: slerp goes from base_model (t = 0, the multimodal model) to the "
                               "other model; name one of the two models")
        entries = sorted(entries, key=lambda e: e[1].resolve() == base.resolve())
        base = None
    else:
        if base is not None and not shared.base:
            raise VlmergeError(f"{path}: base_model: mergekit's {name} takes none (vlmerge's {method} has no base)")
        if base is None and shared.base:
            raise VlmergeError(f"{path}: base_model: missing; mergekit's {name} works on task vectors from it")
        entries = _models(path, raw.get("models"), base)
    (i_text, text, own_text), (i_mm, mm, own_mm) = entries
    top = _parameters(path, "parameters", raw.get("parameters"))
    if raw.get("out_dtype") is not None:
        have = {_dtype_name(d) for d, _ in ModelDir(text).specs.values() if d.is_floating_point}
        if have != {raw["out_dtype"]}:
            raise VlmergeError(f"{path}: out_dtype: {raw['out_dtype']!r}: vlmerge writes each tensor in its input's "
                               f"type ({', '.join(sorted(have))} in {text})")
    known = shared.shared | shared.per_model | ({"weight": None} if shared.weights else {})
    for where, given in (("parameters", top), (f"models[{i_text}].parameters", own_text),
                         (f"models[{i_mm}].parameters", own_mm)):
        for key in given:
            if key not in known:
                raise VlmergeError(f"{path}: {where}.{key}: not a parameter of mergekit's {name} "
                                   f"(expected {', '.join(known)})")
            if key in shared.shared and where != "parameters":
                raise VlmergeError(f"{path}: {where}.{key}: mergekit's {name} takes it once for all models "
                                   "(top-level parameters)")
    values = shared.shared | {k: v for k, v in top.items() if k in shared.shared}
    for key in (*shared.per_model, *(["weight"] if shared.weights else [])):
        default = top.get(key, shared.per_model.get(key))
        t, m = own_text.get(key, default), own_mm.get(key, default)
        if t is None or m is None:
            raise VlmergeError(f"{path}: models[{i_text if t is None else i_mm}].parameters.{key}: missing "
                               f"(mergekit's {name} weighs each model)")
        if key != "weight" and t != m:
            raise VlmergeError(f"{path}: models[{i_mm}].parameters.{key}: {m!r}, models[{i_text}] has {t!r}: vlmerge "
                               f"takes one {key} for both models")
        values[key] = (t, m) if key == "weight" else t
    alpha, values = _alpha(path, method, values)
    return Recipe(text, mm, base, method, alpha, _ours(path, method, values))


def _model_path(path: Path, where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise VlmergeError(f"{path}: {where}: expected the path of a local model folder")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise VlmergeError(f"{path}: {where}: {value}: not a local folder (vlmerge reads local Hugging Face "
                           "folders; it downloads nothing)")
    return folder


def _parameters(path: Path, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise VlmergeError(f"{path}: {where}: expected a mapping of parameters")
    for key, v in value.items():
        if isinstance(v, (list, dict)):
            raise VlmergeError(f"{path}: {where}.{key}: a gradient or a list of filters; vlmerge takes one value "
                               "for every tensor")
    return value


def _models(path: Path, value: Any, base: Path | None) -> list[tuple[int, Path, dict[str, Any]]]:
    """The two merged models (their place in the list, folder, parameters); an entry that is `base` is
    left out (a recipe may list the base among the models; mergekit gives it no weight)."""
    if not isinstance(value, list):
        raise VlmergeError(f"{path}: models: expected a list of {{model: PATH, parameters: …}}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise VlmergeError(f"{path}: models[{i}]: expected {{model: PATH, parameters: …}}")
        folder = _model_path(path, f"models[{i}].model", entry["model"])
        if base is None or folder.resolve() != base.resolve():
            out.append((i, folder, _parameters(path, f"models[{i}].parameters", entry.get("parameters"))))
    if len(out) != 2:
        raise VlmergeError(f"{path}: models: {len(out)} model(s) besides the base; vlmerge merges two "
                           "(the text model first, then the multimodal one)")
    return out


def _alpha(path: Path, method: str, values: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """α from the weights (the text model's share of their sum), and, where mergekit does not normalise
    by that sum, the sum folded into λ; slerp's t."""
    values = dict(values)
    if method == "slerp":
        t = values.pop("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise VlmergeError(f"{path}: parameters.t: expected a number (the weight of the text model, α)")
        return float(t), values
    w_text, w_mm = values.pop("weight")
    for i, w in enumerate((w_text, w_mm)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise VlmergeError(f"{path}: models[{i}].parameters.weight: {w!r}: expected a finite number")
    total = w_text + w_mm
    if total <= 0:
        raise VlmergeError(f"{path}: models: the weights sum to {total:g}; vlmerge's α is the text model's share of "
                           "a positive sum")
    # Without consensus, normalize only divides by Σw: the sum is α's denominator (true) or goes into λ.
    normalize = values["normalize"] if SHARED[method].consensus else values.pop("normalize")
    if not normalize and total != 1:
        if method == "linear":
            raise VlmergeError(f"{path}: parameters.normalize: false with weights summing to {total:g}: vlmerge's "
                               "linear interpolates (weights summing to 1, or normalize: true)")
        values["lambda"] = values["lambda"] * total  # θ₀ + λ·Σ wᵢτᵢ = θ₀ + (λ·Σw)·(α·τ_text + (1−α)·τ_mm)
    return w_text / total, values


def _ours(path: Path, method: str, values: dict[str, Any]) -> dict[str, Any]:
    """mergekit's parameters as our method's: renamed, each one ours declares, the others checked to be
    the values our method behaves as."""
    shared, declared = SHARED[method], get_method(method).declared
    back = {v: k for k, v in RENAMED.items()}
    params = {} if method != "slerp" else {"eps": SLERP_EPS}  # mergekit's rule for nearly parallel tensors
    for key, value in values.items():
        ours = back.get(key, key)
        if ours in declared:
            params[ours] = value
        elif key in shared.ignored:
            continue
        elif key in shared.implied and value != shared.implied[key]:
            raise VlmergeError(f"{path}: parameters.{key}: {value!r}: vlmerge's {method} behaves as "
                               f"{key}: {shared.implied[key]!r}")
    params |= {k: v for k, v in shared.implied.items() if k in declared}
    return params
