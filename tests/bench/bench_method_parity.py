"""Our merge methods against mergekit's: per method, max |ours - mergekit| over every tensor.

    .venv/bin/python tests/bench/bench_method_parity.py [--peers .venv-peers] [--methods ties,sce]
                                                        [--alphas 0.3,0.7] [--intermediate 512] [--tmp DIR]

One trio of 6-layer `LlamaForCausalLM` checkpoints (hidden 768, vocab 16000, untied embeddings,
float32 safetensors; MLP width 512 by default, ~46M parameters, to keep the bench near 10 minutes
on 2 cores; --intermediate 1760 is bench_merge's ~63M) is built in a temp dir: the base from
seed 3, and the text and multimodal models as base + a modest perturbation, 0.2 x each tensor's
RMS x (a shared part + the model's own part)/sqrt(2) (seeds 4; 1 and 2), so that the task
vectors are meaningful (cosine ~0.5 between them, signs disagreeing on a third of the entries).

Ours is always `python -m vlmerge merge --text --mm [--base] --method M --param k=v --alpha 0.3,0.7`
(one process, every alpha; none for a method without α; the code of this checkout: PYTHONPATH=src). Mergekit (the peer venv,
`make peers`) is, per method:

- `cli`: its CLI, `mergekit-yaml` (dtype float32), one run per alpha, with models text (weight
  alpha) and mm (weight 1 - alpha), base_model the base; slerp: base_model mm, t = alpha; a
  method without weights (model_stock, sce, karcher at alpha 0.5) gets none. The whole models
  are compared.
- `masks` (the random ones: dare_linear, dare_ties, della, della_linear): mergekit's own merge
  method (`mergekit.merge_methods.registry.get(name)`, the object its CLI runs per tensor), called
  in the peer interpreter on every tensor of the trio, `TensorGroup.from_tensors([text, mm, base])`,
  with `torch.bernoulli` replaced by our draw: the keep mask mergekit would have drawn for an
  input is (u < p), p its keep probabilities, u our uniforms for (seed, input, tensor)
  (vlmerge.merge.methods.parts.uniforms, replicated here and checked to be equal). Everything
  else, the probabilities included, is mergekit's code. The whole models are compared.
- `function`: karcher at alphas other than 0.5, which mergekit's method (uniform weights) cannot
  express: its `karcher_merge_tensors(tensors, [alpha, 1 - alpha])` on every tensor.

The figure per method is the largest difference over its alphas and tensors; goal <= 1e-6.
Methods mergekit does not have (dare, magmax, tsv, iso_c, regmean) are not compared. A missing
peer venv is an error. What remains is float32 rounding where the two compute differently:
linear (mergekit divides by the weight sum, ours lerps), slerp (ours in float64, mergekit in
float32; both lerp only for nearly parallel tensors, ours at |cos| > 1 - 1e-6, mergekit at
0.9995: no tensor of the trio is that close), the L1-rescaled methods (the norms are sums over
millions of entries, reduced by one thread in ours on 2 cores (the merging thread beside the 2
writers) and by torch's default threads in mergekit), karcher and nuslerp (reductions, likewise).
`small_parity` runs every case on a few small tensors in seconds (tests/test_merge_methods.py,
with the peer venv).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from bench_merge import tensors  # (this folder: the script's, and the peer interpreter's, first path)

REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--quiet"]
GOAL = 1e-6

@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: our parameters, and mergekit's (besides the weights alpha, 1 - alpha)."""

    ours: dict = dataclasses.field(default_factory=dict)  # our --param
    per_model: dict = dataclasses.field(default_factory=dict)  # mergekit's per-model parameters
    shared: dict = dataclasses.field(default_factory=dict)  # mergekit's shared parameters
    base: bool = True  # --base / base_model
    random: bool = False  # masks injected (mergekit's own draw cannot be ours)


CASES: dict[str, Case] = {
    "linear": Case(base=False),
    "slerp": Case(base=False),
    "task_arithmetic": Case(),
    "ties": Case({"density": 0.2}, {"density": 0.2}),
    "dare_linear": Case({"density": 0.5, "seed": 7}, {"density": 0.5}, random=True),
    "dare_ties": Case({"density": 0.5, "seed": 7}, {"density": 0.5}, random=True),
    "breadcrumbs": Case({"density": 0.9, "gamma": 0.01}, {"density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": Case({"density": 0.9, "gamma": 0.01}, {"density": 0.9, "gamma": 0.01}),
    "della": Case({"density": 0.5, "epsilon": 0.15, "seed": 7}, {"density": 0.5, "epsilon": 0.15}, random=True),
    "della_linear": Case({"density": 0.5, "epsilon": 0.15, "seed": 7}, {"density": 0.5, "epsilon": 0.15}, random=True),
    "model_stock": Case(),
    "nuslerp": Case(),
    "nuslerp (no base)": Case(base=False),
    "karcher": Case(base=False),  # alpha 0.5 by its CLI, other alphas by its function
    "sce": Case({"select_topk": 0.5}, shared={"select_topk": 0.5}),
}
NO_ALPHA = {"model_stock", "sce"}  # takes_alpha=False: merged once (ours without --alpha; the peer's 0.5 unused)
NO_WEIGHTS = {"slerp", "model_stock", "sce", "karcher"}  # mergekit methods without a weight parameter


def method_of(key: str) -> str:
    return key.split(" ")[0]


def peer_call(key: str, alpha: float, ours: Path, tag: str) -> dict:
    """How the peer calls mergekit's merge for one case at one alpha: a method on a TensorGroup
    of the inputs (roles, which one is the base), or karcher's function with weights."""
    case, name = CASES[key], method_of(key)
    if name == "karcher" and alpha != 0.5:
        return {"tag": tag, "ours": str(ours), "alpha": alpha, "function": "karcher",
                "params": {"max_iter": 10, "tol": 1e-5}}
    if name == "slerp":
        roles, base, params = ["text", "mm"], "mm", {"t": alpha}
    else:
        roles, base = (["text", "mm", "base"], "base") if case.base else (["text", "mm"], None)
        params = case.per_model | case.shared
        if name not in NO_WEIGHTS:
            params = params | {"weight": {"text": alpha, "mm": 1 - alpha}}
    return {"tag": tag, "ours": str(ours), "alpha": alpha, "method": name, "roles": roles, "base": base,
            "params": params, "seed": case.ours.get("seed", 0) if case.random else None}


# -- the draw, replicated from vlmerge.merge.methods.parts (the peer interpreter has no vlmerge) ---

def uniforms(shape, seed: int, role: str, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{role}:{name}".encode()))
    return torch.rand(tuple(shape), generator=g)


class Reader:
    def __init__(self, folder: Path):
        self.index, self.handles = tensors(folder), {}

    def get(self, name: str) -> torch.Tensor:
        f, key = self.index[name]
        if f not in self.handles:
            self.handles[f] = safe_open(f, framework="pt")
        return self.handles[f].get_tensor(key)


def max_abs_diff(a: Path, b: Path) -> float:
    ra, rb = Reader(a), Reader(b)
    if ra.index.keys() != rb.index.keys():
        only = sorted(ra.index.keys() ^ rb.index.keys())
        sys.exit(f"bench_method_parity: {a} and {b} hold different tensors, e.g. {only[0]!r}")
    worst = 0.0
    for name in ra.index:
        x, y = ra.get(name), rb.get(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            sys.exit(f"bench_method_parity: {name}: {x.dtype}{list(x.shape)} in {a}, {y.dtype}{list(y.shape)} in {b}")
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


# -- the peer side: mergekit's merge functions on every tensor, compared with our output ----------

def peer(job_file: str) -> None:
    """In the peer interpreter: job = {inputs: {role: folder}, runs: [peer_call(...)]}; prints
    {tag: max |ours - mergekit|} as JSON on the last line."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.karcher import karcher_merge_tensors
    from mergekit.merge_methods.registry import get

    job = json.loads(Path(job_file).read_text())
    inputs = {role: Reader(Path(p)) for role, p in job["inputs"].items()}
    queue: list[torch.Tensor] = []

    def injected_bernoulli(p, *args, **kwargs):  # mergekit's draw -> our uniforms for this input
        u = queue.pop(0)
        return (u.view(p.shape) < p).to(p.dtype)

    torch.bernoulli = injected_bernoulli
    result = {}
    for run in job["runs"]:
        ours, worst, a = Reader(Path(run["ours"])), 0.0, run["alpha"]
        for name in inputs["text"].index:
            ts = {role: reader.get(name) for role, reader in inputs.items()}
            if run.get("function") == "karcher":
                merged = karcher_merge_tensors([ts["text"], ts["mm"]], [a, 1 - a], **run["params"])
            else:
                if run["seed"] is not None:  # the text input draws first (mergekit's order of the models)
                    queue[:] = [uniforms(ts["text"].shape, run["seed"], role, name) for role in ("text", "mm")]
                roles = run["roles"]
                group = TensorGroup.from_tensors([ts[r] for r in roles], ids=roles, name=name,
                                                 base_index=roles.index(run["base"]) if run["base"] else None)
                (merged,) = get(run["method"])([group], parameters=run["params"])
            worst = max(worst, (merged.double() - ours.get(name).double()).abs().max().item())
        result[run["tag"]] = worst
    print(json.dumps(result))


def peer_recipes(job_file: str) -> None:
    """In the peer interpreter: mergekit's merge (`run_merge`, what mergekit-yaml runs) of each recipe of
    job = {runs: [{yaml, out, masks}]}. masks, for a random method: {seed, rename: [ours, mergekit's]
    tensor-name prefix, drop: our `dare`'s p or null}: mergekit's draw is replaced by ours for (seed,
    input, tensor), the input by its place in the recipe's models (text, mm): kept where u < mergekit's
    keep probability, or, for `dare` (its own rule), where u >= p."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.options import MergeOptions

    job = json.loads(Path(job_file).read_text())
    queue: list[torch.Tensor] = []
    rule: dict = {}

    def injected_bernoulli(p, *args, **kwargs):
        u = queue.pop(0).view(p.shape)
        return (u >= rule["drop"] if rule["drop"] is not None else u < p).to(p.dtype)

    original, bernoulli = GeneralizedTaskArithmeticMerge.merge_group, torch.bernoulli

    def merge_group(self, group, /, **parameters):  # our uniforms for each input of this tensor, in mergekit's order
        name = group.metadata.name
        mk, ours = rule["rename"]
        name = ours + name[len(mk):] if mk and name.startswith(mk) else name
        queue[:] = [uniforms(e.tensor.shape, rule["seed"], rule["roles"][str(e.id)], name) for e in group.non_base]
        return original(self, group, **parameters)

    for run in job["runs"]:
        source = Path(run["yaml"]).read_text()
        cfg = yaml.safe_load(source)
        masks = run.get("masks")
        if masks:
            rule.clear()
            rule.update(masks, roles={cfg["models"][0]["model"]: "text", cfg["models"][1]["model"]: "mm"})
        GeneralizedTaskArithmeticMerge.merge_group = merge_group if masks else original
        torch.bernoulli = injected_bernoulli if masks else bernoulli
        run_merge(MergeConfiguration.model_validate(cfg), run["out"], options=MergeOptions(copy_tokenizer=False, quiet=True),
                  config_source=source)
    print(json.dumps({"merged": len(job["runs"])}))


def run_peer(peer_python: Path, inputs: dict[str, Path], runs: list[dict], job: Path) -> dict[str, float]:
    job.write_text(json.dumps({"inputs": {r: str(p) for r, p in inputs.items()}, "runs": runs}))
    return _in_peer(peer_python, "--peer", job)


def run_peer_recipes(peer_python: Path, runs: list[dict], job: Path) -> None:
    """mergekit's merge of each recipe in `runs` (`peer_recipes`), in the peer interpreter."""
    job.write_text(json.dumps({"runs": runs}))
    _in_peer(peer_python, "--peer-recipes", job)


def _in_peer(peer_python: Path, mode: str, job: Path) -> dict:
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(peer_python), __file__, mode, str(job)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench_method_parity: the peer run failed:\n{proc.stdout.decode(errors='replace')[-3000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def small_parity(tmp: Path, peer_python: Path) -> dict[str, float]:
    """Every case at alpha 0.3 (and 0.5 for karcher's method) on a few small tensors, ours in this
    process, mergekit's merge called per tensor in the peer (`peer_call`): {case@alpha: max diff}.
    For tests/test_merge_methods.py; seconds."""
    from safetensors.torch import save_file

    from vlmerge.merge.methods import TensorInputs, get_method

    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (24, 16), "b.weight": (16,), "c.weight": (40, 24), "d.weight": (3, 7, 5)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    trio = {"base": base} | {r: {k: v + 0.3 * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()}
                             for r in ("text", "mm")}
    folders = {}
    for role, state in trio.items():
        (tmp / role).mkdir()
        save_file(state, tmp / role / "model.safetensors")
        folders[role] = tmp / role
    runs = []
    for key, case in CASES.items():
        name = method_of(key)
        m = get_method(name)
        for a in [0.5] if name in NO_ALPHA else ([0.3, 0.5] if name == "karcher" else [0.3]):
            xs = [TensorInputs.twins(k, trio["text"][k], trio["mm"][k], base[k] if case.base else None) for k in shapes]
            params = m.params(case.ours)
            if m.prepare:
                params |= m.prepare(xs, params)
            tag = f"{key}@{a:g}"
            out = tmp / f"ours-{len(runs)}"
            out.mkdir()
            ours_alpha = None if name in NO_ALPHA else a
            save_file({x.name: m.merge(x, ours_alpha, params).contiguous() for x in xs}, out / "model.safetensors")
            runs.append(peer_call(key, a, out, tag))
    return run_peer(peer_python, folders, runs, tmp / "job.json")


# -- our side ---------------------------------------------------------------------------------------

def make_trio(root: Path, intermediate: int) -> tuple[dict[str, Path], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmerge.hf import quiet_transformers

    config = LlamaConfig(hidden_size=768, intermediate_size=intermediate, num_hidden_layers=6,
                         num_attention_heads=12, num_key_value_heads=12, vocab_size=16000,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).float()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shared, own = torch.Generator().manual_seed(4), {"text": 1, "mm": 2}
    noise = {k: torch.randn(v.shape, generator=shared) for k, v in base.items()}
    dirs = {}
    with quiet_transformers():
        model.save_pretrained(root / "base")
        dirs["base"] = root / "base"
        for role, seed in own.items():
            g = torch.Generator().manual_seed(seed)
            state = {k: v + 0.2 * v.pow(2).mean().sqrt() * (noise[k] + torch.randn(v.shape, generator=g)) / math.sqrt(2)
                     for k, v in base.items()}
            model.load_state_dict(state)
            model.save_pretrained(root / role)
            dirs[role] = root / role
    return dirs, sum(v.numel() for v in base.values())


def mergekit_config(path: Path, key: str, alpha: float, trio: dict[str, Path]) -> Path:
    """mergekit-yaml's configuration for one case at one alpha (JSON is YAML)."""
    case, name = CASES[key], method_of(key)
    weights = {} if name in NO_WEIGHTS else {"text": {"weight": alpha}, "mm": {"weight": round(1 - alpha, 10)}}
    cfg = {"merge_method": name, "dtype": "float32",
           "models": [{"model": str(trio[r]), "parameters": weights.get(r, {}) | case.per_model}
                      for r in ("text", "mm")]}
    if name == "slerp":
        cfg |= {"base_model": str(trio["mm"]), "parameters": {"t": alpha}}
    elif case.base:
        cfg["base_model"] = str(trio["base"])
    if case.shared:
        cfg["parameters"] = cfg.get("parameters", {}) | case.shared
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run(cmd: list[str], what: str, python_env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=python_env or ENV)
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace")[-3000:]
        sys.exit(f"bench_method_parity: {what} failed (exit {proc.returncode}):\n{out}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run in the peer interpreter
    ap.add_argument("--peer-recipes", help=argparse.SUPPRESS)  # internal: mergekit on recipes, in the peer
    ap.add_argument("--peers", default=str(REPO / ".venv-peers"), help="the peer venv with mergekit (make peers)")
    ap.add_argument("--methods", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--alphas", default="0.3,0.7", help="the alphas of the methods that take one")
    ap.add_argument("--intermediate", type=int, default=512, help="MLP width (512: ~46M parameters; 1760: ~63M)")
    ap.add_argument("--tmp", help="folder for the temp dir (default: the system's)")
    args = ap.parse_args()
    if args.peer:
        return peer(args.peer)
    if args.peer_recipes:
        return peer_recipes(args.peer_recipes)

    sys.path.insert(0, str(REPO / "src"))  # this checkout's vlmerge, as the subprocesses (ENV's PYTHONPATH)
    from vlmerge.merge.methods.parts import uniforms as our_uniforms

    peer_python, mergekit = Path(args.peers) / "bin" / "python", Path(args.peers) / "bin" / "mergekit-yaml"
    if not mergekit.is_file():
        sys.exit(f"bench_method_parity: no mergekit at {mergekit}: run `make peers` first, or pass --peers")
    assert torch.equal(our_uniforms((3, 5), 7, "mm", "w", "cpu"), uniforms((3, 5), 7, "mm", "w")), \
        "the replicated draw is not vlmerge's: update uniforms() here"
    methods = args.methods.split(",") if args.methods else list(CASES)
    unknown = [m for m in methods if m not in CASES]
    if unknown:
        sys.exit(f"bench_method_parity: unknown method(s) {unknown}; known: {', '.join(CASES)}")
    alphas = [float(a) for a in args.alphas.split(",")]
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-parity-", dir=args.tmp) as d:
        tmp = Path(d)
        trio, n_params = make_trio(tmp, args.intermediate)
        for key in methods:
            case, name = CASES[key], method_of(key)
            method_alphas = [0.5] if name in NO_ALPHA else alphas
            if name == "karcher" and 0.5 not in method_alphas:
                method_alphas = [0.5, *method_alphas]
            cmd = [sys.executable, "-m", "vlmerge", "merge", "--quiet", "--method", name, "--text", str(trio["text"]),
                   "--mm", str(trio["mm"]), "--out", str(tmp / "ours")]
            cmd += [] if name in NO_ALPHA else ["--alpha", ",".join(map(str, method_alphas))]
            cmd += ["--base", str(trio["base"])] if case.base else []
            for k, v in case.ours.items():
                cmd += ["--param", f"{k}={json.dumps(v)}"]
            ours_s = run(cmd, f"vlmerge merge --method {name}")
            ours = {a: tmp / "ours" if len(method_alphas) == 1 else tmp / "ours" / f"alpha-{a:.2f}"
                    for a in method_alphas}
            diffs, mk_s, compared, peer_runs = {}, 0.0, [], []
            for a in method_alphas:
                if case.random or (name == "karcher" and a != 0.5):
                    peer_runs.append(peer_call(key, a, ours[a], str(a)))
                    compared.append(f"{a:g}:{'masks' if case.random else 'function'}")
                    continue
                cfg = mergekit_config(tmp / "mk.yml", key, a, trio)
                mk_s += run([str(mergekit), str(cfg), str(tmp / "mk"), *MERGEKIT_OPTIONS], f"mergekit-yaml {key} {a}")
                diffs[a] = max_abs_diff(ours[a], tmp / "mk")
                shutil.rmtree(tmp / "mk")
                compared.append(f"{a:g}:cli")
            if peer_runs:
                t0 = time.perf_counter()
                peer_diffs = run_peer(peer_python, trio, peer_runs, tmp / "job.json")
                mk_s += time.perf_counter() - t0
                diffs |= {float(a): v for a, v in peer_diffs.items()}
            shutil.rmtree(tmp / "ours")
            worst = max(diffs.values())
            rows.append((key, worst, " ".join(compared)))
            print(f"  {key:18s} max |ours - mergekit| {worst:8.1e}   ({' '.join(compared)}; "
                  f"ours {ours_s:5.1f} s, mergekit {mk_s:5.1f} s)", flush=True)
    total = time.perf_counter() - t_start
    print(f"method parity with mergekit: trio of {n_params / 1e6:.0f}M-parameter LlamaForCausalLM (6 layers, "
          f"hidden 768, intermediate {args.intermediate}, vocab 16000), float32; {os.cpu_count()} cores, load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {total:.0f} s in all")
    for method, worst, compared in rows:
        flag = "" if worst <= GOAL else "   <-- above the goal"
        print(f"  {method:18s} {worst:8.1e}   {compared}{flag}")
    bad = [m for m, w, *_ in rows if w > GOAL]
    if bad:
        sys.exit(f"bench_method_parity: beyond {GOAL:g}: {', '.join(bad)}")


if __name__ == "__main__":
    main()
