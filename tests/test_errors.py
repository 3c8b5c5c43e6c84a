"""The bad-input catalogue: each bad input a user may give, its exit code, the words its one line
must hold (the file, key or item, and what was expected), and no damage to what exists.

Every case runs the real CLI (`vlmerge.cli.main`, in-process to stay fast) against one shared
world of small inputs and existing outputs; that world must be byte-identical afterwards (no new,
changed or removed file), which also proves that no stage writes into its input folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlmerge.cli import main
from vlmerge.demo.world import save_random_dinov2
from vlmerge.hf import quiet_transformers
from vlmerge.merge.core import merge_to_disk

from conftest import BLIMP

UNWRITABLE = "/sys/vlmerge-test-out"  # refused even to root (tests may run as root, where chmod cannot)
ENCODER_DIM = 32


def _tiny_lm(path: Path, seed: int, **overrides) -> Path:
    """A small LlamaForCausalLM with a word-level tokenizer: a model `merge` and `eval` accept."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=64)
    with quiet_transformers():
        LlamaForCausalLM(LlamaConfig(**(shape | overrides))).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(61)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)
    return path


def _store(path: Path, features: np.ndarray, ids: list[str] | None = None, null: np.ndarray | None = None) -> Path:
    """A linked feature store as precompute writes one, of these rows (ids img0, img1, … unless given)."""
    import h5py

    text = h5py.string_dtype("utf-8")
    ids = [f"img{i}" for i in range(len(features))] if ids is None else ids
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features, dtype=text if features.dtype == object else None)
        f.create_dataset("image_ids", data=np.array(ids, dtype=object), dtype=text)
        f.create_dataset("null_feature", data=np.zeros(features.shape[1:], np.float32) if null is None else null)
    return path


def _copy_with_weights(src: Path, dst: Path, weights: bytes | None) -> Path:
    shutil.copytree(src, dst)
    if weights is None:
        (dst / "model.safetensors").unlink()
    else:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("errors")
    text, mm = _tiny_lm(w / "text", 1), _tiny_lm(w / "mm", 2)
    weights = (text / "model.safetensors").read_bytes()
    _copy_with_weights(text, w / "trunc", weights[: len(weights) // 2])
    _copy_with_weights(text, w / "garbage", b"\x00garbage\xff" * 100)
    _copy_with_weights(text, w / "noweights", None)
    nan = load_file(mm / "model.safetensors")
    nan["model.norm.weight"][3] = float("nan")
    shutil.copytree(mm, w / "nan")
    save_file(nan, w / "nan" / "model.safetensors", metadata={"format": "pt"})
    _tiny_lm(w / "wide", 2, intermediate_size=48)
    _copy_with_weights(text, w / "misfit", (w / "wide" / "model.safetensors").read_bytes())
    _copy_with_weights(text, w / "pickled", None)
    torch.save(load_file(text / "model.safetensors"), w / "pickled" / "pytorch_model.bin")  # loads, if unpickled
    partial = {k: v for k, v in load_file(text / "model.safetensors").items() if "layers.1.mlp" not in k}
    shutil.copytree(text, w / "partial")
    save_file(partial, w / "partial" / "model.safetensors", metadata={"format": "pt"})
    merge_to_disk(text, mm, w / "merged", "linear", [0.5])

    (w / "cfgdir").mkdir()
    (w / "latin1.yaml").write_bytes(b"experiment: caf\xe9\n")
    (w / "bad.yaml").write_text("experiment: [demo\n")
    (w / "outfile").write_text("a file where a folder is expected\n")
    for name, config in (("cfgnotjson", '{"architectures": ["Llama'), ("cfglist", "[1, 2]")):
        shutil.copytree(text, w / name)
        (w / name / "config.json").write_text(config)

    # Existing outputs a failed command must leave exactly as they are.
    out = w / "out"
    (out / "results/demo/metrics").mkdir(parents=True)
    (out / "results/demo/metrics/kept.parquet").write_bytes(b"PAR1 not really")
    (out / "features").mkdir()
    (out / "features/tstore.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)  # a truncated store
    (out / "runs/demo/text").mkdir(parents=True)
    (out / "runs/demo/text/metrics.jsonl").write_text('{"step": 1}\n')

    save_random_dinov2(w / "enc", 0, hidden_size=ENCODER_DIM, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    shutil.copytree(w / "enc", w / "enc_pickle")  # the same encoder as a pickle: never unpickled
    torch.save(load_file(w / "enc/model.safetensors"), w / "enc_pickle/pytorch_model.bin")
    (w / "enc_pickle/model.safetensors").unlink()
    rng = np.random.default_rng(0)
    np.save(w / "part.npy", rng.standard_normal((3, ENCODER_DIM)).astype(np.float32))
    np.save(w / "narrow.npy", rng.standard_normal((3, ENCODER_DIM - 1)).astype(np.float32))
    np.save(w / "black.npy", np.zeros(ENCODER_DIM + 1, dtype=np.float32))
    np.save(w / "null.npy", np.zeros(ENCODER_DIM, dtype=np.float32))
    (w / "captions.json").write_text(json.dumps(["a", "b", "c"]))
    (w / "latin1.json").write_bytes(b'["a", "caf\xe9", "c"]')

    blimp = w / "blimp"
    blimp.mkdir()
    first = sorted(BLIMP.glob("*.jsonl"))[0]
    (blimp / first.name).write_text("".join(first.read_text().splitlines(keepends=True)[:4]))

    # The results of an evaluation of `text`, and results that no record names (an older vlmerge's)
    assert main(_eval(w, out="evaldone")) == 0
    (w / "evalold").mkdir()
    shutil.copy(w / "evaldone" / "results.parquet", w / "evalold" / "results.parquet")

    # VQA questions on images img0…img2, and feature stores of them, sound and not
    vqa = [{"question": f"w{i} w5", "target_ans": "w7", "distractors": ["w8", "w9"], "image_id": f"img{i}",
            "question_id": i} for i in range(3)]
    (w / "vqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in vqa))
    stores, rows = w / "stores", rng.standard_normal((3, ENCODER_DIM)).astype(np.float32)
    stores.mkdir()
    _store(stores / "ok.h5", rows)
    _store(stores / "int8.h5", rows.astype(np.int8))
    _store(stores / "bool.h5", rows > 0)
    _store(stores / "inf.h5", np.where(np.arange(3)[:, None] == 1, np.inf, rows).astype(np.float32))
    _store(stores / "nan_null.h5", rows, null=np.full(ENCODER_DIM, np.nan, np.float32))
    _store(stores / "text.h5", rows.astype(str).astype(object))
    _store(stores / "dupids.h5", rows, ids=["img0", "img1", "img0"])
    _store(stores / "fewids.h5", rows, ids=["img0", "img1"])
    _store(stores / "narrow_null.h5", rows, null=np.zeros(ENCODER_DIM - 1, np.float32))
    _recipes(w)
    return w


def _recipes(w: Path) -> None:
    """mergekit recipes of the world's models (`merge --recipe`), sound and not."""
    import yaml

    def models(*weights, **own):
        return [{"model": f"{w}/{m}", "parameters": ({} if wt is None else {"weight": wt}) | own.get(m, {})}
                for m, wt in zip(("text", "mm", "partial"), weights)]

    linear = {"merge_method": "linear", "models": models(0.3, 0.7)}
    ties = {"merge_method": "ties", "base_model": f"{w}/partial", "models": models(0.5, 0.5)}
    recipes = {
        "linear": linear,
        "ties": ties,
        "slices": linear | {"slices": [{"sources": [{"model": f"{w}/text", "layer_range": [0, 2]}]}]},
        "passthrough": linear | {"merge_method": "passthrough"},
        "unknownkey": linear | {"merges": 2},
        "gradient": linear | {"models": [{"model": f"{w}/text", "parameters": {"weight": [0, 1]}}, models(1, 1)[1]]},
        "densities": ties | {"models": models(0.5, 0.5, text={"density": 0.5}, mm={"density": 0.3})},
        "bf16": linear | {"dtype": "bfloat16"},
        "outbf16": linear | {"out_dtype": "bfloat16"},
        "hub": linear | {"models": [models(1, 1)[0], {"model": "org/some-model", "parameters": {"weight": 1}}]},
        "three": linear | {"models": models(0.2, 0.3, 0.5)},
        "tiesnorm": ties | {"parameters": {"normalize": False}},
        "slerpbase": {"merge_method": "slerp", "base_model": f"{w}/partial", "models": models(None, None),
                      "parameters": {"t": 0.5}},
        "noweight": linear | {"models": models(0.3, None)},
        "unknownparam": linear | {"parameters": {"lambda": 2}},
        "list": [linear],
    }
    (w / "recipes").mkdir()
    for name, recipe in recipes.items():
        (w / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    (w / "recipes" / "notyaml.yaml").write_text("merge_method: [linear\n")


def _import(w: Path, **fields: str) -> str:
    spec = {"captions": f"{w}/captions.json", "npy": f"['{w}/part.npy']", "prefix": "cc", "encoder": f"{w}/enc",
            "layer": "-2", "pooling": "mean_patch"} | fields
    return "features.imports=[{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}]"


def _precompute(w: Path, *extra: str) -> list[str]:
    return ["precompute", "--quiet", f"paths.root={w}/out", f"features.encoder={w}/enc", "features.images=[]",
            "features.name=imp", "features.num_workers=0", *extra]


def _merge(w: Path, *extra: str, text: str = "text", mm: str = "mm", out: str = "new", alpha: str = "0.5") -> list[str]:
    return ["merge", "--quiet", "--text", f"{w}/{text}", "--mm", f"{w}/{mm}", "--alpha", alpha,
            "--out", out if out.startswith("/") else f"{w}/{out}", *extra]


def _recipe(w: Path, name: str, *extra: str) -> list[str]:
    return ["merge", "--quiet", "--recipe", f"{w}/recipes/{name}.yaml", "--out", f"{w}/new", *extra]


def _eval(w: Path, *extra: str, model: str = "text", out: str = "evalout") -> list[str]:
    return ["eval", "--quiet", "--model", f"{w}/{model}", "--task", f"blimp={w}/blimp",
            "--out", out if out.startswith("/") else f"{w}/{out}", f"paths.root={w}/out", *extra]


def _eval_store(w: Path, store: str) -> list[str]:
    """eval of a task with images, its features from `stores/<store>.h5`."""
    return ["eval", "--quiet", "--model", f"{w}/text", "--task", f"vqa={w}/vqa.jsonl", "--features",
            f"{w}/stores/{store}.h5", "--out", f"{w}/evalout", f"paths.root={w}/out"]


def _config(w: Path, *extra: str) -> list[str]:
    return ["config", f"paths.root={w}/out", *extra]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: object  # (world) -> list[str]
    words: tuple[str, ...]
    code: int = 2
    env: tuple[tuple[str, str], ...] = ()


CASES = [
    # -- the config file and its values ---------------------------------------------------------------
    Case("config is a folder", lambda w: ["config", "--config", f"{w}/cfgdir"], ("cfgdir", "is a folder", "YAML")),
    Case("config not UTF-8", lambda w: ["config", "--config", f"{w}/latin1.yaml"], ("latin1.yaml", "not UTF-8")),
    Case("config missing", lambda w: ["config", "--config", f"{w}/nope.yaml"], ("nope.yaml", "not found")),
    Case("config not YAML", lambda w: ["config", "--config", f"{w}/bad.yaml"], ("bad.yaml", "not valid YAML")),
    Case("experiment escapes the root", lambda w: _config(w, "experiment=../../x"), ("experiment", "plain name", "'../../x'")),
    Case("experiment hidden", lambda w: _config(w, "experiment=.x"), ("experiment", "plain name")),
    Case("experiment with a slash", lambda w: _config(w, "experiment=a/b"), ("experiment", "plain name")),
    Case("store name escapes", lambda w: _config(w, "features.name=../x"), ("features.name", "plain name")),
    Case("root empty", lambda w: ["config", "paths.root="], ("paths.root", "not an empty path")),
    Case("root blank", lambda w: ["config", "paths.root=' '"], ("paths.root", "not an empty path")),
    Case("sweep alpha 1.5", lambda w: _config(w, "sweep.alphas=[0, 1.5]"),
         ("sweep.alphas", "1.5 is outside [0, 1]", "sweep.allow_extrapolation=true")),
    Case("sweep alpha NaN", lambda w: _config(w, "sweep.alphas=[.nan]"), ("sweep.alphas", "nan is not a finite number")),
    Case("sweep alpha inf", lambda w: _config(w, "sweep.alphas=[.inf]", "sweep.allow_extrapolation=true"),
         ("sweep.alphas", "inf is not a finite number")),
    Case("sweep alphas empty", lambda w: _config(w, "sweep.alphas=[]"), ("sweep.alphas", "no alpha given")),
    Case("sweep alphas repeat", lambda w: _config(w, "sweep.alphas=[0.5, 0.5]"), ("sweep.alphas", "0.5 is given twice")),
    Case("unknown key", lambda w: _config(w, "train.lrr=1"), ("unknown key", "train.lrr", "allowed here")),
    Case("negative learning rate", lambda w: _config(w, "train.lr=-1"), ("train.lr", "greater than 0")),
    Case("override without value", lambda w: _config(w, "train.lr"), ("train.lr", "expected KEY.PATH=VALUE")),
    Case("override value not YAML", lambda w: _config(w, "sweep.alphas=[0,"), ("'sweep.alphas=[0,'", "not valid YAML")),
    Case("import without provenance", lambda w: _config(w, "features.imports=[{captions: c.json, npy: [a.npy], prefix: cc}]"),
         ("features.imports.0.encoder", "Field required")),
    Case("import prefix escapes", lambda w: _config(w, _import(w, prefix="../cc")), ("features.imports.0.prefix", "plain name")),
    Case("config --get unknown", lambda w: _config(w, "--get", "train.nope"), ("--get train.nope", "no such key")),
    Case("heads do not divide the width", lambda w: _config(w, "model.hidden_size=64", "model.num_heads=5"),
         ("model.num_heads", "must divide hidden_size (64)", "got 5")),
    Case("unknown monitor", lambda w: _config(w, "train.monitor=[tensorboard, mlflow]"),
         ("train.monitor.1", "'tensorboard' or 'wandb'", "mlflow")),
    Case("monitor twice", lambda w: _config(w, "train.monitor=[wandb, wandb]"),
         ("train.monitor", "'wandb' is given twice")),
    Case("checkpoint words negative", lambda w: _config(w, "checkpoints.words=[1000, -5]"),
         ("checkpoints.words", "-5 is not a positive word count")),
    Case("checkpoint words unsorted", lambda w: _config(w, "checkpoints.words=[2000, 1000]"),
         ("checkpoints.words", "1000 does not follow a smaller count", "increasing order")),
    Case("checkpoint words repeat", lambda w: _config(w, "checkpoints.words=[1000, 1000]"),
         ("checkpoints.words", "1000 does not follow a smaller count", "each once")),
    # -- merge -----------------------------------------------------------------------------------------
    Case("merge no alpha", lambda w: _merge(w, alpha=""), ("--alpha ''", "no alpha given")),
    Case("merge alpha NaN", lambda w: _merge(w, "--allow-extrapolation", alpha="nan"), ("--alpha 'nan'", "not a finite number")),
    Case("merge alpha inf", lambda w: _merge(w, "--allow-extrapolation", alpha="0,inf"), ("--alpha '0,inf'", "not a finite")),
    Case("merge alpha 1.5", lambda w: _merge(w, alpha="1.5"), ("--alpha '1.5'", "outside [0, 1]", "--allow-extrapolation")),
    Case("merge alphas repeat", lambda w: _merge(w, alpha="0.2,0.2"), ("--alpha '0.2,0.2'", "given twice")),
    Case("merge alpha not a number", lambda w: _merge(w, alpha="half"), ("--alpha 'half'", "expected numbers")),
    Case("merge out is a file (several α)", lambda w: _merge(w, out="outfile", alpha="0.2,0.4"),
         ("outfile", "--out is a file", "expected a folder")),
    Case("merge out is a file (one α)", lambda w: _merge(w, out="outfile"), ("outfile", "--out is a file")),
    Case("merge out unwritable", lambda w: _merge(w, out=UNWRITABLE), ("/sys", "not writable")),
    Case("merge truncated weights", lambda w: _merge(w, text="trunc"),
         ("trunc/model.safetensors", "not a readable safetensors file")),
    Case("merge garbage weights", lambda w: _merge(w, mm="garbage"),
         ("garbage/model.safetensors", "not a readable safetensors file")),
    Case("merge no weights", lambda w: _merge(w, text="noweights"), ("noweights", "no model.safetensors")),
    Case("merge missing model", lambda w: _merge(w, mm="absent"), ("absent", "no model.safetensors")),
    Case("merge NaN weights", lambda w: _merge(w, mm="nan"), ("nan", "'model.norm.weight' holds NaN or Inf")),
    Case("merge other shapes", lambda w: _merge(w, mm="wide"), ("differ at tensor", "shape")),
    Case("merge unknown method", lambda w: _merge(w, "--method", "blend"), ("'blend'", "known:")),
    Case("merge bad param", lambda w: _merge(w, "--param", "density"), ("--param 'density'", "expected NAME=VALUE")),
    Case("merge param value not YAML", lambda w: _merge(w, "--method", "slerp", "--param", "eps=[0,"),
         ("--param 'eps=[0,'", "not valid YAML")),
    Case("merge param above its range", lambda w: _merge(w, "--method", "ties", "--base", f"{w}/mm", "--param", "density=5"),
         ("method ties", "density=5", "expected a value in [0, 1]")),
    Case("merge param not a number", lambda w: _merge(w, "--method", "dare", "--base", f"{w}/mm", "--param", "p=abc"),
         ("method dare", "p='abc'", "expected a number")),
    Case("merge dare dropping everything", lambda w: _merge(w, "--method", "dare", "--base", f"{w}/mm", "--param", "p=1"),
         ("p=1", "expected a value in [0, 1)")),
    Case("merge slerp eps 0", lambda w: _merge(w, "--method", "slerp", "--param", "eps=0"), ("eps=0", "(0, 1]")),
    Case("merge slerp eps negative", lambda w: _merge(w, "--method", "slerp", "--param", "eps=-1"), ("eps=-1", "(0, 1]")),
    Case("merge ties lam NaN", lambda w: _merge(w, "--method", "ties", "--base", f"{w}/mm", "--param", "lam=.nan"),
         ("lam=nan", "expected a finite number")),
    Case("merge ties lam not a number", lambda w: _merge(w, "--method", "ties", "--base", f"{w}/mm", "--param", "lam=x"),
         ("lam='x'", "expected a number")),
    Case("merge seed not whole", lambda w: _merge(w, "--method", "dare", "--base", f"{w}/mm", "--param", "seed=1.5"),
         ("seed=1.5", "expected a whole number")),
    Case("merge config.json not JSON", lambda w: _merge(w, text="cfgnotjson"), ("cfgnotjson/config.json", "not valid JSON")),
    Case("merge config.json not an object", lambda w: _merge(w, mm="cfglist"), ("cfglist/config.json", "JSON object")),
    Case("merge task vectors without base", lambda w: _merge(w, "--method", "task_arithmetic"), ("--base",)),
    Case("merge no models", lambda w: ["merge", "--quiet", "--out", f"{w}/new"], ("--text and --mm", "--recipe")),
    Case("recipe missing", lambda w: _recipe(w, "absent"), ("absent.yaml", "no such file")),
    Case("recipe not YAML", lambda w: _recipe(w, "notyaml"), ("notyaml.yaml", "not valid YAML")),
    Case("recipe a list", lambda w: _recipe(w, "list"), ("list.yaml", "expected mergekit's YAML recipe")),
    Case("recipe with --text", lambda w: _recipe(w, "linear", "--text", f"{w}/text"), ("--recipe", "leave out --text")),
    Case("recipe and a param it sets", lambda w: _recipe(w, "ties", "--param", "lam=2"),
         ("--param lam", "the recipe sets it", "seed")),
    Case("recipe slices", lambda w: _recipe(w, "slices"), ("slices.yaml", "slices:", "whole models")),
    Case("recipe unknown key", lambda w: _recipe(w, "unknownkey"), ("unknownkey.yaml", "merges:", "expected merge_method")),
    Case("recipe unshared method", lambda w: _recipe(w, "passthrough"),
         ("merge_method: 'passthrough'", "not one of the methods vlmerge shares", "ties")),
    Case("recipe gradient", lambda w: _recipe(w, "gradient"), ("models[0].parameters.weight", "gradient", "one value")),
    Case("recipe densities differ", lambda w: _recipe(w, "densities"),
         ("models[1].parameters.density: 0.3", "models[0] has 0.5", "one density")),
    Case("recipe bfloat16", lambda w: _recipe(w, "bf16"), ("dtype: 'bfloat16'", "float32")),
    Case("recipe out_dtype", lambda w: _recipe(w, "outbf16"), ("out_dtype: 'bfloat16'", "float32 in")),
    Case("recipe hub model", lambda w: _recipe(w, "hub"), ("models[1].model: org/some-model", "not a local folder")),
    Case("recipe three models", lambda w: _recipe(w, "three"), ("models: 3 model(s)", "merges two", "the text model first")),
    Case("recipe ties without normalize", lambda w: _recipe(w, "tiesnorm"),
         ("parameters.normalize: False", "ties behaves as normalize: True")),
    Case("recipe slerp base elsewhere", lambda w: _recipe(w, "slerpbase"), ("base_model:", "name one of the two models")),
    Case("recipe weight missing", lambda w: _recipe(w, "noweight"), ("models[1].parameters.weight: missing",)),
    Case("recipe unknown parameter", lambda w: _recipe(w, "unknownparam"),
         ("parameters.lambda", "not a parameter of mergekit's linear", "normalize")),
    Case("merge over another merge", lambda w: _merge(w, out="merged", alpha="0.7"),
         ("merged", "exists and is not this merge")),
    # -- sweep plan ------------------------------------------------------------------------------------
    Case("sweep plan grid value out of range",
         lambda w: ["sweep", "plan", f"paths.root={w}/out", "sweep.methods=[{name: ties, grid: {density: [0.2, 5]}}]"],
         ("sweep.methods", "method ties", "density=5", "[0, 1]")),
    Case("sweep plan param NaN", lambda w: ["sweep", "plan", f"paths.root={w}/out",
                                             "sweep.methods=[{name: ties, params: {lam: .nan}}]"],
         ("sweep.methods", "lam=nan", "finite")),
    Case("status before training", lambda w: ["status", f"paths.root={w}/out"],
         ("runs/demo/text", "no checkpoints", "train the text run first")),
    # -- eval ------------------------------------------------------------------------------------------
    Case("eval out is a file", lambda w: _eval(w, out=f"{w}/outfile"), ("outfile", "--out is a file")),
    Case("eval out unwritable", lambda w: _eval(w, out=UNWRITABLE), (UNWRITABLE, "not writable")),
    Case("eval no weights", lambda w: _eval(w, model="noweights"), ("noweights", "cannot load the model")),
    Case("eval truncated weights", lambda w: _eval(w, model="trunc"), ("trunc", "cannot load the model")),
    Case("eval garbage weights", lambda w: _eval(w, model="garbage"), ("garbage", "cannot load the model")),
    Case("eval not a model", lambda w: _eval(w, model="absent"), ("absent", "not a model directory")),
    Case("eval config.json not JSON", lambda w: _eval(w, model="cfgnotjson"), ("cfgnotjson/config.json", "not valid JSON")),
    Case("eval unknown task", lambda w: ["eval", "--model", f"{w}/text", "--task", "blimpp=x", "--out", f"{w}/e"],
         ("'blimpp'", "known:")),
    # a NaN compares false with everything: the first candidate, the correct one, would win every item
    Case("eval NaN weights", lambda w: _eval(w, model="nan"),
         ("/nan: task blimp", "8 of 8 scores are NaN or infinite")),
    Case("eval weights of another shape", lambda w: _eval(w, model="misfit"),
         ("misfit", "do not fit its config.json", "model.layers.0.mlp.down_proj.weight is [16, 48] in the weights, "
          "[16, 32] in the model")),
    Case("eval pickle-only weights", lambda w: _eval(w, model="pickled"),
         ("pickled", "cannot load the model", "no file named model.safetensors")),
    Case("eval weights missing tensors", lambda w: _eval(w, model="partial"),  # else started from random values
         ("partial", "the weights lack 3 tensor(s)", "model.layers.1.mlp.down_proj.weight")),
    Case("eval over another model's results", lambda w: _eval(w, model="mm", out="evaldone"),
         ("evaldone", "another evaluation", "/mm)", "choose another --out")),
    Case("eval over results of no record", lambda w: _eval(w, out="evalold"), ("evalold", "another evaluation")),
    Case("eval store of int8", lambda w: _eval_store(w, "int8"), ("int8.h5", "features are int8", "floating-point")),
    Case("eval store of bool", lambda w: _eval_store(w, "bool"), ("bool.h5", "features are bool", "floating-point")),
    Case("eval store of strings", lambda w: _eval_store(w, "text"),
         ("text.h5", "features are object", "floating-point")),
    Case("eval store with an Inf row", lambda w: _eval_store(w, "inf"),
         ("inf.h5", "row 1 (image 'img1')", "NaN or Inf")),
    Case("eval store with a NaN null", lambda w: _eval_store(w, "nan_null"),
         ("nan_null.h5", "null_feature", "NaN or Inf")),
    Case("eval store with repeated ids", lambda w: _eval_store(w, "dupids"),
         ("dupids.h5", "'img0' has several rows", "each image once")),
    Case("eval store with fewer ids than rows", lambda w: _eval_store(w, "fewids"),
         ("fewids.h5", "2 ", "3 feature rows", "one string id per row")),
    Case("eval store of another width", lambda w: _eval_store(w, "narrow_null"),
         ("narrow_null.h5", f"[3, {ENCODER_DIM}]", f"[{ENCODER_DIM - 1}]", "one row's shape")),
    # -- analyze -----------------------------------------------------------------------------------------
    Case("analyze out is a file", lambda w: ["analyze", "--out", f"{w}/outfile", f"paths.root={w}/out"],
         ("outfile", "--out is a file")),
    Case("analyze out unwritable", lambda w: ["analyze", "--out", UNWRITABLE, f"paths.root={w}/out"],
         (UNWRITABLE, "not writable")),
    Case("analyze figures of an unknown kind", lambda w: ["analyze", f"paths.root={w}/out", "analysis.figures=svg"],
         ("analysis.figures", "'png', 'interactive' or 'both'", "'svg'")),
    # -- precompute ------------------------------------------------------------------------------------
    Case("negative shard count", lambda w: _precompute(w, "--num-shards", "-1"), ("--num-shards -1", "at least 1")),
    Case("shard out of range", lambda w: _precompute(w, "--shard", "5", "--num-shards", "2"), ("--shard 5", "expected 0..1")),
    Case("array task id not a number", lambda w: _precompute(w), ("SLURM_ARRAY_TASK_ID='abc'", "whole number"),
         env=(("SLURM_ARRAY_TASK_ID", "abc"),)),
    Case("array size differs", lambda w: _precompute(w), ("3 tasks", "features.num_shards is 1"),
         env=(("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "3"))),
    Case("truncated store on rerun", lambda w: _precompute(w, "features.name=tstore", _import(w)),
         ("tstore.h5", "not a readable feature store")),
    Case("import captions not UTF-8", lambda w: _precompute(w, _import(w, captions=f"{w}/latin1.json")),
         ("latin1.json", "not UTF-8")),
    Case("import of another encoder with a local null", lambda w: _precompute(w, _import(w, encoder="dinov2-small")),
         ("features.imports[0].null_feature", "dinov2-small", "black-image row")),
    Case("import of another width", lambda w: _precompute(w, _import(w, npy=f"['{w}/narrow.npy']")),
         ("narrow.npy", f"makes {ENCODER_DIM}-d ones: declare the encoder that made them")),
    Case("import of another width than the store's",  # an encoder of unknown width: the store's is checked
         lambda w: _precompute(w, _import(w, encoder="x", npy=f"['{w}/narrow.npy']", null_feature=f"{w}/null.npy")),
         ("narrow.npy", f"expected features of shape [N, {ENCODER_DIM}]")),
    Case("import null row of another width", lambda w: _precompute(w, _import(w, encoder="x", null_feature=f"{w}/black.npy")),
         ("black.npy", f"black image's feature of shape [{ENCODER_DIM}]")),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: content hashes, so that any change shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_the_catalogue_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_a_nonzero_exit_and_no_damage(world, case, capsys, monkeypatch):
    for k, v in case.env:
        monkeypatch.setenv(k, v)
    before = _snapshot(world)
    code = main(case.argv(world))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(err) == 1, err
    assert err[0].startswith("vlmerge ") and ": error: " in err[0], err
    missing = [w for w in case.words if w not in err[0]]
    assert not missing, (missing, err[0])
    assert _snapshot(world) == before


def test_a_non_utf8_line_is_a_counted_problem_not_a_failure(world, tmp_path, capsys):
    blimp = tmp_path / "blimp"
    shutil.copytree(world / "blimp", blimp)
    (paradigm,) = blimp.glob("*.jsonl")
    lines = paradigm.read_bytes().splitlines(keepends=True)
    paradigm.write_bytes(b"".join(lines[:2]) + lines[2].replace(b'"', b'"\xff', 1) + b"".join(lines[3:]))
    code = main(["eval", "--quiet", "--model", f"{world}/text", "--task", f"blimp={blimp}", "--out",
                 str(tmp_path / "eval"), f"paths.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 problem(s) (1 malformed line)" in err and f"{paradigm.name}:3: malformed line: not UTF-8" in err
    assert (tmp_path / "eval" / "results.parquet").is_file()


def test_a_truncated_feature_store_given_to_eval_is_one_line(world):
    from vlmerge.data import FeatureTable
    from vlmerge.errors import VlmergeError

    with pytest.raises(VlmergeError, match=r"tstore.h5: not a readable feature store .*run `vlmerge precompute` again"):
        FeatureTable(world / "out/features/tstore.h5")


def test_a_full_disk_during_a_merge_is_one_line_and_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    import errno

    from vlmerge.merge import io as merge_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(merge_io.SafetensorsWriter, "write", full)
    out = tmp_path / "merged"
    assert main(_merge(world, out=str(out), alpha="0.3,0.6")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "could not write the merge (No space left on device)" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def _blimp_with(tmp_path: Path, world: Path, change) -> Path:
    """The world's BLiMP paradigm with its lines (dicts) changed by `change`."""
    blimp = tmp_path / "blimp"
    blimp.mkdir()
    (paradigm,) = (world / "blimp").glob("*.jsonl")
    lines = change([json.loads(line) for line in paradigm.read_text().splitlines()])
    (blimp / paradigm.name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return blimp


def test_repeated_ids_are_counted_problems_and_only_the_first_is_scored(world, tmp_path, capsys):
    import pandas as pd

    blimp = _blimp_with(tmp_path, world, lambda lines: [*lines, {**lines[1], "sentence_good": "w1 w2"}])
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text((world / "vqa.jsonl").read_text() + json.dumps({**json.loads(
        (world / "vqa.jsonl").read_text().splitlines()[0]), "question": "w3"}) + "\n")
    code = main(["eval", "--quiet", "--model", f"{world}/text", "--task", f"blimp={blimp}", "--task", f"vqa={vqa}",
                 "--features", f"{world}/stores/ok.h5", "--out", str(tmp_path / "eval"), f"paths.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 problem(s) (2 duplicate id)" in err, err
    assert "blimp[4]: duplicate id" in err and "vqa[3]: duplicate id: '0' is item 0's too (kept that)" in err
    items = pd.read_parquet(tmp_path / "eval" / "items.parquet")
    assert items.groupby("task").size().to_dict() == {"blimp": 4, "vqa": 3}
    assert not items.duplicated(["task", "example_id"]).any()


def test_a_sentence_longer_than_eval_max_tokens_is_a_counted_problem_not_terabytes(world, tmp_path, capsys):
    import pandas as pd

    # 5,000 tokens, over eval.max_tokens (a 10 MB sentence would take terabytes of attention)
    long = " ".join(["w1"] * 5_000)
    blimp = _blimp_with(tmp_path, world, lambda lines: [{**lines[0], "sentence_good": long}, *lines[1:]])
    code = main(["eval", "--quiet", "--model", f"{world}/text", "--task", f"blimp={blimp}", "--out",
                 str(tmp_path / "eval"), f"paths.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 problem(s) (1 too long)" in err and "blimp[0]: too long: a sequence over 4096 tokens" in err
    results = pd.read_parquet(tmp_path / "eval" / "results.parquet")
    assert set(results.n) == {3}


def test_eval_again_into_its_own_out_replaces_its_results(world, tmp_path, capsys):
    out = tmp_path / "eval"
    shutil.copytree(world / "evaldone", out)
    assert main(_eval(world, out=str(out))) == 0, capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text())["model"] == str((world / "text").resolve())
    # a control with shuffled features is another evaluation
    assert main(_eval(world, "--shuffle-features", "1", out=str(out))) == 2
    assert "another evaluation" in capsys.readouterr().err


def test_an_os_error_without_a_file_name_is_one_line_without_an_empty_name(world, capsys, monkeypatch):
    import errno

    from vlmerge.evaluate import run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "write_results", full)
    assert main(_eval(world, out=str(world / "evalout"))) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["vlmerge eval: error: No space left on device"], err


def test_a_pickle_only_encoder_is_refused_not_unpickled(world):
    from precompute.encoder import load_encoder
    from vlmerge.errors import VlmergeError

    with pytest.raises(VlmergeError, match=r"features.encoder: .*enc_pickle: cannot load"):
        load_encoder(str(world / "enc_pickle"), -2, "mean_patch")
