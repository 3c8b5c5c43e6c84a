"""RTE fine-tuning time: our `vlmerge finetune` against the BabyLM 2025 pipeline's, same model, same data, same run.

    BABYLM_PIPELINE=DIR .venv/bin/python tests/bench/bench_finetune.py [--repeats 3] [--quick]

DIR is a checkout of the official pipeline (github.com/babylm/evaluation-pipeline-2025: the folder
holding evaluation_pipeline/); it is not pip-installable and is not copied here. Without it this
prints one line and exits 0. The official side runs with the peers' python (`make peers`: its
trainer imports scikit-learn and wandb at the top), ours with this python's `vlmerge` CLI.

The data are written here in BabyLM's layout, `glue_filtered/rte.{train,valid}.jsonl`
(`sentence1`, `sentence2`, `label`): --train (600) and --valid (150) items whose premises join
real BLiMP sentences (`../shared/data/blimp`, the good ones) up to a length drawn log-normally
(median 35 words, 10 to 250, like RTE's premises) and whose hypothesis is one of the premise's
sentences (~10 words). The label is learnable by a small model in a few epochs: 1 when the
premise's sentences come from one half of BLiMP's 67 paradigms (every other one by name), 0 when
from the other half; each premise keeps to one paradigm, train and valid draw from disjoint
sentences. (A label that needs the hypothesis matched against the premise, as RTE's, stayed at
chance for this model in three epochs in our trials.)

The model: a LlamaForCausalLM (hidden 128, --layers 4, 4 heads, MLP 512, random init, seed 0)
with a byte-level BPE tokenizer of 4000 tokens trained on the BLiMP sentences
(`vlmerge.precompute.tokenizer.train_bpe`) whose template makes a pair `<s> A </s> B`, saved by
save_pretrained. Both sides fine-tune it with the same recipe: batch 32, --epochs 3, lr --lr
(3e-4: at the pipeline's 3e-5 it reached only ~0.63 valid accuracy in 3 epochs in our trials, at
3e-4 ~0.7, further from the blind model's chance level), length <= 512, seed 42, the
other hyperparameters the pipeline's defaults (ours' config defaults are the same), the classifier
on the last real token (official: `--padding_side left --take_final`; ours:
`finetune.padding_side=left`), the epoch of best valid accuracy kept.

Timing: each side is a subprocess with the same environment (OMP_NUM_THREADS = this process's
CPUs, OMP_WAIT_POLICY=PASSIVE, which our CLI sets anyway, HF_HUB_OFFLINE=1), run --repeats times,
interleaved, the median reported. Two figures each: the whole process's wall time (imports, model
load and all), and the fine-tuning proper: ours' own figure from its log line (`Run.run`: the
epochs and each epoch's valid scoring; tokenisation and loading before it); the official's from
its `Trainer.train()` call to the end of its script (the epochs with their valid scoring, then its
final valid evaluation and its predictions on --predict_data, both of which it runs again on the
kept model), timed by a wrapper that patches nothing but a clock around `Trainer.train` and runs
`evaluation_pipeline.finetune.run` as `python -m` would (runpy). The speed-up is official / ours
of the medians (goal >= 1.5x); each repeat's own ratio is printed too (its two runs are adjacent,
so a busy machine moves them together; the load average is printed beside them). --quick: one
repeat of 192 train / 64 valid items, for development.

Parity: a second model, "blind", the same one with every attention layer's value and output
projections zeroed (no token reads any other; fine-tuning cannot move them off zero, as each
one's gradient is a product with the other), so it sees only the input's last token and must stay
near chance, is fine-tuned by both pipelines too; both must rank the intact model above it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
SHARED_BLIMP = REPO.parent / "shared" / "data" / "blimp"  # CI puts ../shared beside the checkout
ENTRY = "evaluation_pipeline/finetune/run.py"

# Run by the peers' python as `python wrapper.py TIMES_JSON ARGS...`: the official CLI exactly as
# `python -m evaluation_pipeline.finetune.run ARGS...`, with a clock started when Trainer.train is
# entered (after the imports, the model and tokenizer load and the data loaders) and read at the end.
OFFICIAL_WRAPPER = textwrap.dedent('''
    import json, runpy, sys, time
    t_start = time.perf_counter()
    from evaluation_pipeline.finetune import trainer
    times = {}
    train = trainer.Trainer.train
    def timed_train(self):
        times["train_start"] = time.perf_counter()
        train(self)
        times["train_end"] = time.perf_counter()
    trainer.Trainer.train = timed_train
    out = sys.argv[1]
    sys.argv = ["evaluation_pipeline.finetune.run"] + sys.argv[2:]
    runpy.run_module("evaluation_pipeline.finetune.run", run_name="__main__", alter_sys=True)
    end = time.perf_counter()
    json.dump({"finetune_s": end - times["train_start"], "train_s": times["train_end"] - times["train_start"],
               "before_s": times["train_start"] - t_start}, open(out, "w"))
''')

# Run by the peers' python: are the official classifier head's initial weights (seed_everything(42),
# AutoModel.from_pretrained, then the head) the same as ours (torch.manual_seed(42), then the head)?
HEAD_CHECK = textwrap.dedent('''
    import argparse, json, sys, torch
    from evaluation_pipeline.finetune.utils import seed_everything
    from evaluation_pipeline.finetune.classifier_model import ModelForSequenceClassification
    seed_everything(42)
    args = argparse.Namespace(model_name_or_path=sys.argv[1], revision_name=None, enc_dec=False, causal=False,
                              take_final=True, num_labels=2, classifier_layer_norm_eps=1e-5, classifier_dropout=0.1)
    head = ModelForSequenceClassification(args).classifier.nonlinearity
    torch.save({k: v.clone() for k, v in head.state_dict().items()}, sys.argv[2])
''')


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# --- data -------------------------------------------------------------------------------------------

def load_paradigms(folder: Path) -> dict[str, list[str]]:
    """Paradigm UID -> its good sentences (sorted, distinct)."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        sys.exit(f"bench_finetune: {folder}: no BLiMP <UID>.jsonl files (--blimp)")
    return {f.stem: sorted({json.loads(line)["sentence_good"] for line in f.read_text(encoding="utf-8").splitlines()
                            if line.strip()}) for f in files}


def rte_items(n: int, paradigms: dict[str, list[str]], part: int, seed: int) -> list[dict]:
    """`n` RTE rows: a premise of one paradigm's sentences (10-250 words), a hypothesis from it, the
    label the paradigm's half. `part` 0 draws from each paradigm's first 70% of sentences, 1 from the rest."""
    import numpy as np

    rng = random.Random(seed)
    uids = sorted(paradigms)
    halves = (uids[1::2], uids[0::2])  # label 0, label 1
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.5)
        pool = paradigms[rng.choice(halves[label])]
        cut = int(len(pool) * 0.7)
        pool = pool[:cut] if part == 0 else pool[cut:]
        target = int(np.clip(rng.lognormvariate(np.log(35), 0.75), 10, 250))
        premise: list[str] = []
        while sum(len(s.split()) for s in premise) < target:
            premise.append(rng.choice(pool))
        rows.append({"sentence1": " ".join(premise), "sentence2": rng.choice(premise), "label": label})
    return rows


def write_task(folder: Path, train: list[dict], valid: list[dict]) -> Path:
    glue = folder / "glue_filtered"
    glue.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("valid", valid)):
        (glue / f"rte.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return glue


# --- models -----------------------------------------------------------------------------------------

def build_models(out: Path, sentences: list[str], layers: int) -> tuple[Path, Path, int, float]:
    """The intact model and its blind twin (attention's v and o projections zeroed), each a
    save_pretrained folder with the tokenizer; (intact, blind, vocabulary, parameters in millions)."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmerge.config import TokenizerConfig
    from vlmerge.hf import quiet_transformers
    from vlmerge.precompute.tokenizer import train_bpe

    tok = train_bpe(sentences, TokenizerConfig(vocab_size=4000), progress=False)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    intact, blind = out / "intact", out / "blind"
    with quiet_transformers():
        model.save_pretrained(intact)
        tok.save_pretrained(intact)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.weight.zero_()
                layer.self_attn.o_proj.weight.zero_()
        model.save_pretrained(blind)
        tok.save_pretrained(blind)
    return intact, blind, len(tok), sum(p.numel() for p in model.parameters()) / 1e6


# --- the two pipelines --------------------------------------------------------------------------------

def run_env(threads: int, pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def read_results(path: Path) -> dict[str, float]:
    """BabyLM's results.txt: `metric: value` lines."""
    pairs = (line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    return {k.strip(): float(v) for k, v in pairs}


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"bench_finetune: {what} failed (exit {done.returncode}):\n  {' '.join(cmd)}\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout, wall


def official(pipeline: Path, work: Path, model: Path, glue: Path, hp: dict, threads: int, tag: str) -> dict:
    """The pipeline's `python -m evaluation_pipeline.finetune.run` (through the timing wrapper)."""
    wrapper, times = work / "official_wrapper.py", work / f"official_{tag}.json"
    wrapper.write_text(OFFICIAL_WRAPPER)
    results = work / f"official_results_{tag}"
    cmd = [str(PEER_PYTHON), str(wrapper), str(times),
           "--model_name_or_path", str(model), "--train_data", str(glue / "rte.train.jsonl"),
           "--valid_data", str(glue / "rte.valid.jsonl"), "--predict_data", str(glue / "rte.valid.jsonl"),
           "--task", "rte", "--num_labels", "2", "--batch_size", str(hp["batch"]), "--learning_rate", str(hp["lr"]),
           "--num_epochs", str(hp["epochs"]), "--sequence_length", str(hp["max_length"]), "--results_dir", str(results),
           "--metrics", "accuracy", "f1", "mcc", "--metric_for_valid", "accuracy", "--seed", str(hp["seed"]),
           "--padding_side", "left", "--take_final"]
    _, wall = run_checked(cmd, work, run_env(threads, str(pipeline)), f"the official pipeline ({model.name})")
    t = json.loads(times.read_text())
    metrics = read_results(results / model.stem / "main" / "finetune" / "rte" / "results.txt")
    return {"wall": wall, "finetune": t["finetune_s"], "train": t["train_s"], "metrics": metrics}


def vlmerge_cli() -> list[str]:
    exe = Path(sys.executable).with_name("vlmerge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "vlmerge"]


def ours(work: Path, model: Path, glue: Path, hp: dict, threads: int, tag: str) -> dict:
    """`vlmerge finetune --model M --task rte=FOLDER --out OUT` with the same recipe."""
    out = work / f"ours_{tag}"
    cmd = [*vlmerge_cli(), "finetune", "--model", str(model), "--task", f"rte={glue}", "--out", str(out), "--quiet",
           "finetune.padding_side=left", f"finetune.lr={hp['lr']}", f"finetune.batch_size={hp['batch']}",
           f"finetune.epochs={hp['epochs']}", f"finetune.seed={hp['seed']}", f"finetune.max_length={hp['max_length']}",
           "finetune.valid_batch_size=64", "compute.device=cpu"]
    stdout, wall = run_checked(cmd, work, run_env(threads, None), f"vlmerge finetune ({model.name})")
    found = re.search(r"steps, ([0-9.]+) s\)", stdout)
    if not found:
        sys.exit(f"bench_finetune: no time in vlmerge finetune's log line:\n{stdout[-2000:]}")
    metrics = read_results(out / "finetune" / "rte" / "results.txt")
    return {"wall": wall, "finetune": float(found.group(1)), "metrics": metrics}


# --- explanations ---------------------------------------------------------------------------------------

def padding_facts(model: Path, glue: Path, hp: dict) -> dict:
    """Tokens (padding included) per training epoch: the pipeline's random batches against our
    length-bucketed ones (loop.epoch_batches), for the same inputs; and our bucket window."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from vlmerge.finetune.loop import BUCKET_BATCHES, epoch_batches
    from vlmerge.hf import quiet_transformers

    rows = [json.loads(line) for line in (glue / "rte.train.jsonl").read_text().splitlines()]
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model)
    ids = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
              max_length=hp["max_length"])["input_ids"]
    lengths = np.array([len(x) for x in ids])
    b = hp["batch"]
    g = torch.Generator().manual_seed(hp["seed"])
    order = torch.randperm(len(lengths), generator=g).numpy()[: len(lengths) // b * b]
    random_tokens = sum(len(chunk) * lengths[chunk].max() for chunk in np.split(order, len(order) // b))
    bucketed = epoch_batches(lengths, b, np.random.default_rng(hp["seed"]))
    bucket_tokens = sum(len(chunk) * lengths[chunk].max() for chunk in bucketed)
    return {"real": int(lengths[order].sum()), "random": int(random_tokens), "bucketed": int(bucket_tokens),
            "window": BUCKET_BATCHES * b, "train": len(lengths), "min": int(lengths.min()),
            "median": int(np.median(lengths)), "max": int(lengths.max())}


def head_init_same(model: Path, pipeline: Path, work: Path, threads: int) -> bool | None:
    """Whether the official head's initial weights equal ours (None: the check could not run)."""
    import torch

    from vlmerge.finetune.classifier import classifier_head

    script, saved = work / "head_check.py", work / "official_head.pt"
    script.write_text(HEAD_CHECK)
    done = subprocess.run([str(PEER_PYTHON), str(script), str(model), str(saved)], cwd=work,
                          env=run_env(threads, str(pipeline)), capture_output=True, text=True)
    if done.returncode != 0:
        return None
    theirs = torch.load(saved, weights_only=True)  # a state dict of tensors: nothing to unpickle
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    torch.manual_seed(42)  # as loop.Run does before building the head
    mine = classifier_head(hidden, 2, 0.1, 1e-5).state_dict()
    return theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)


# --- main ---------------------------------------------------------------------------------------------

def pipeline_dir() -> Path | None:
    given = os.environ.get("BABYLM_PIPELINE")
    if not given:
        print("bench_finetune: skipped: BABYLM_PIPELINE is not set (a checkout of github.com/babylm/"
              "evaluation-pipeline-2025, the folder holding evaluation_pipeline/)")
        return None
    if not (Path(given) / ENTRY).is_file():
        print(f"bench_finetune: skipped: BABYLM_PIPELINE={given} has no {ENTRY} (expected the folder holding "
              "evaluation_pipeline/ of github.com/babylm/evaluation-pipeline-2025)")
        return None
    return Path(given).resolve()


def fmt_metrics(m: dict[str, float]) -> str:
    return f"accuracy {m['accuracy']:.3f} f1 {m['f1']:.3f} mcc {m['mcc']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, help="timed runs of each side, interleaved; the median (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="for development: by default 1 repeat, 192 train / 64 valid items")
    ap.add_argument("--train", type=int, help="train items (default 600)")
    ap.add_argument("--valid", type=int, help="valid items (default 150)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--no-parity", action="store_true", help="skip the blind model's runs")
    ap.add_argument("--blimp", type=Path, default=SHARED_BLIMP, help="a folder of BLiMP <UID>.jsonl files")
    ap.add_argument("--keep", type=Path, help="write the data, models and outputs here (kept) instead of a temp dir")
    args = ap.parse_args()
    for name, full, quick in (("repeats", 3, 1), ("train", 600, 192), ("valid", 150, 64)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    pipeline = pipeline_dir()
    if pipeline is None:
        return
    if not PEER_PYTHON.is_file():
        sys.exit(f"bench_finetune: {PEER_PYTHON} missing; run `make peers`")
    probe = subprocess.run([str(PEER_PYTHON), "-c", "import sklearn, wandb"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"bench_finetune: the peers' python lacks the pipeline's imports (scikit-learn, wandb; "
                 f"env/peers.txt): run `make peers`\n{probe.stderr[-500:]}")

    threads = len(os.sched_getaffinity(0))
    hp = {"lr": args.lr, "batch": 32, "epochs": args.epochs, "max_length": 512, "seed": 42}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as d:
        work = args.keep.resolve() if args.keep else Path(d)
        work.mkdir(parents=True, exist_ok=True)
        paradigms = load_paradigms(args.blimp)
        glue = write_task(work / "data", rte_items(args.train, paradigms, 0, seed=1),
                          rte_items(args.valid, paradigms, 1, seed=2))
        t0 = time.perf_counter()
        intact, blind, vocab, params = build_models(work / "models", [s for v in paradigms.values() for s in v],
                                                    args.layers)
        build_s = time.perf_counter() - t0
        facts = padding_facts(intact, glue, hp)
        same_head = head_init_same(intact, pipeline, work, threads)

        runs: dict[str, list[dict]] = {"official": [], "vlmerge": []}
        load0 = os.getloadavg()[0]
        for r in range(args.repeats):  # interleaved, the order alternating
            sides = ("official", "vlmerge") if r % 2 == 0 else ("vlmerge", "official")
            for side in sides:
                if side == "official":
                    runs[side].append(official(pipeline, work, intact, glue, hp, threads, f"intact{r}"))
                else:
                    runs[side].append(ours(work, intact, glue, hp, threads, f"intact{r}"))
                last = runs[side][-1]
                print(f"  run {r + 1}/{args.repeats} {side:8s}: {last['wall']:6.1f} s process, "
                      f"{last['finetune']:6.1f} s fine-tuning; {fmt_metrics(last['metrics'])}", flush=True)
        parity = None
        if not args.no_parity:
            parity = {"official": official(pipeline, work, blind, glue, hp, threads, "blind"),
                      "vlmerge": ours(work, blind, glue, hp, threads, "blind")}

    med = {side: {k: statistics.median(run[k] for run in v) for k in ("wall", "finetune")} for side, v in runs.items()}
    final = {side: v[0]["metrics"] for side, v in runs.items()}
    steady = {side: all(run["metrics"] == v[0]["metrics"] for run in v) for side, v in runs.items()}
    n = f"median of {args.repeats}"
    print(f"finetune RTE ({args.train} train / {args.valid} valid, {args.epochs} epochs, batch 32, lr {args.lr:g}, "
          f"len <= 512, seed 42), CPU: {cpu_model()}, {threads} threads (OMP_NUM_THREADS, both)")
    print(f"  model: LlamaForCausalLM {args.layers} x 128, 4 heads, vocab {vocab} ({params:.2f}M parameters, random "
          f"init), built in {build_s:.0f} s; inputs {facts['min']}-{facts['max']} tokens (median {facts['median']})")
    for side, label in (("official", "official:"), ("vlmerge", "vlmerge: ")):
        extra = "" if steady[side] else "  (metrics varied across repeats: first run's shown)"
        print(f"{label} {med[side]['wall']:6.1f} s process, {med[side]['finetune']:6.1f} s fine-tuning ({n})   "
              f"{fmt_metrics(final[side])}{extra}")
    print(f"speed-up: {med['official']['finetune'] / med['vlmerge']['finetune']:.1f}x fine-tuning, "
          f"{med['official']['wall'] / med['vlmerge']['wall']:.1f}x whole process (official / ours, the medians; "
          f"goal >= 1.5x)")
    if args.repeats > 1:  # each repeat's two runs are adjacent: their ratio is less exposed to the machine's load
        pairs = [o["finetune"] / v["finetune"] for o, v in zip(runs["official"], runs["vlmerge"])]
        print(f"  each repeat's own ratio (fine-tuning): {', '.join(f'{x:.2f}x' for x in pairs)}; load average "
              f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after ({threads} CPUs)")
    if parity is not None:
        verdict = []
        for side in ("official", "vlmerge"):
            good, bad = final[side]["accuracy"], parity[side]["metrics"]["accuracy"]
            verdict.append(f"{side} {'yes' if good > bad else 'NO'} ({good:.3f} > {bad:.3f})")
        agree = (final["official"]["accuracy"] > parity["official"]["metrics"]["accuracy"]) == (
            final["vlmerge"]["accuracy"] > parity["vlmerge"]["metrics"]["accuracy"])
        print(f"parity: ranking intact > blind (valid accuracy): {', '.join(verdict)}; same ranking: "
              f"{'yes' if agree else 'NO'}")
        print(f"  blind: official {fmt_metrics(parity['official']['metrics'])}; vlmerge "
              f"{fmt_metrics(parity['vlmerge']['metrics'])}")
    head = {True: "the same", False: "different", None: "not compared (the check failed)"}[same_head]
    window = (f"here the window holds all {facts['train']} train items: each batch a band of similar lengths"
              if facts["train"] <= facts["window"] else f"{facts['train']} train items here")
    print(f"why the metrics are not bit-equal: the same recipe, but other batches. The pipeline's DataLoader draws "
          f"random batches (torch's sampler); ours (loop.epoch_batches) permutes with numpy's generator, sorts each "
          f"window of {facts['window']} items by length, cuts it into batches and shuffles the batches ({window}), "
          f"so every step "
          f"sees other examples and the dropout masks fall elsewhere; the padding differs too (rounding only). "
          f"The head's initial weights: {head}. Tokens per training epoch, padding included: random batches "
          f"{facts['random']:,}, length-bucketed {facts['bucketed']:,} ({facts['random'] / facts['bucketed']:.1f}x "
          f"fewer; {facts['real']:,} real).")


if __name__ == "__main__":
    main()
