"""Merge to disk: our 11-alpha linear merge against 11 mergekit runs, one alpha against the I/O floor.

    .venv/bin/python tests/bench/bench_merge.py [--skip-mergekit] [--peers .venv-peers] [--repeats 3] [--threads N]

One pair of 6-layer `LlamaForCausalLM` checkpoints (hidden 768, vocab 16000, untied embeddings,
~63M parameters, float32 safetensors, seeds 1 and 2) is built in a temp dir; every figure is
measured on it in this one run.

1. Sweep: `python -m vlmerge merge --alpha 0,0.1,...,1` (one read of the inputs, 11 outputs)
   against 11 runs of mergekit's CLI (`mergekit-yaml`, `merge_method: linear`, weights alpha and
   1 - alpha, `dtype: float32`) from the peer venv (`make peers`). Both are subprocesses, so
   both include interpreter start-up. Goal: ours >= 10x faster. mergekit runs with its defaults
   (CPU, torch's threads, one output shard: --out-shard-size 5B > 63M) plus --no-copy-tokenizer
   (the pair has none), --async-write (writes overlap merging) and --quiet (no progress bars,
   as ours); --lazy-unpickle only concerns pickled checkpoints, not safetensors. Ours writes
   with two threads beside the merging one, and its alpha 0 and 1 outputs, which equal an input
   bitwise, are copied kernel-side (os.copy_file_range, tensor by tensor after our own header):
   complete, independent files, byte for byte what merging them writes (a test checks this),
   with the same merge.json; every input tensor is still read and checked for NaN/Inf.
2. One alpha in-process (`merge_to_disk(..., [0.3])`) against the I/O floor: read both input
   files completely and write one file of the same size, in 16 MiB blocks. Best of --repeats,
   interleaved. Goal: ours <= 2x the floor.
3. Peak memory (max RSS, from wait4 in a small launcher process) of `python -m vlmerge merge --alpha 0.3` beside the model's
   size and its largest tensor; the peaks of anonymous and file-backed RSS (sampled from
   /proc every 2 ms) say how much of it is the memory-mapped inputs and libraries.
4. Max |ours - mergekit| over all tensors at every alpha. Goal: <= 1e-6.

The inputs are in the page cache for every timing (hot), outputs go to the page cache (no
fsync on either side); dirty pages are flushed (`sync`, not timed) between the phases so that
no side pays for the other's writeback. --threads N sets OMP_NUM_THREADS for every side. A
missing peer venv is an error unless --skip-mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--async-write", "--quiet"]
BLOCK = 16 << 20
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_pair(root: Path, intermediate: int) -> tuple[Path, Path, int]:
    """Two LlamaForCausalLM checkpoints of the same shape from different seeds; returns their size in parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmerge.hf import quiet_transformers

    config = LlamaConfig(hidden_size=768, intermediate_size=intermediate, num_hidden_layers=6,
                         num_attention_heads=12, num_key_value_heads=12, vocab_size=16000,
                         max_position_embeddings=512, tie_word_embeddings=False)
    dirs = []
    for seed, name in ((1, "text"), (2, "mm")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
        with quiet_transformers():
            model.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1], sum(p.numel() for p in model.parameters())


# A small launcher runs each command: a child's max RSS (ru_maxrss) starts at its parent's RSS at
# fork time, so forking from this process (torch and transformers loaded) would report our own RSS.
# The launcher forks from a bare interpreter, times the child, and samples its /proc status.
LAUNCHER = r"""
import json, os, sys, time
out, sample, cmd = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG if sample else 0)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    time.sleep(0.002)
seconds = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": seconds,
               "maxrss": usage.ru_maxrss * 1024, "peaks": peaks}, f)
"""


def run(cmd: list[str], what: str, result: Path, sample: bool = False) -> tuple[float, int, dict[str, int]]:
    """Run `cmd` through the launcher: wall seconds, its max RSS in bytes, sampled peaks of its RSS parts."""
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), "1" if sample else "0", *cmd],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    r = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode}
    if proc.returncode != 0 or r["rc"] != 0:
        sys.exit(f"bench_merge: {what} failed (exit {r['rc']}):\n{proc.stdout.decode(errors='replace')[-3000:]}")
    return r["seconds"], r["maxrss"], r["peaks"]


def mergekit_config(path: Path, text: Path, mm: Path, alpha: float) -> Path:
    # JSON is YAML: no YAML writer needed here.
    path.write_text(json.dumps({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(text), "parameters": {"weight": alpha}},
                   {"model": str(mm), "parameters": {"weight": round(1.0 - alpha, 10)}}],
    }, indent=1))
    return path


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """Tensor name -> (file, name) over every safetensors file of a folder (sharded or not)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out |= {k: (f, k) for k in st.keys()}
    return out


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        only = sorted(ta.keys() ^ tb.keys())
        sys.exit(f"bench_merge: {a} and {b} hold different tensors, e.g. {only[0]!r}")
    worst = 0.0
    handles: dict[Path, object] = {}

    def get(where: tuple[Path, str]) -> torch.Tensor:
        f, name = where
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_tensor(name)

    for name in ta:
        x, y = get(ta[name]), get(tb[name])
        if x.shape != y.shape or x.dtype != y.dtype:
            sys.exit(f"bench_merge: {name}: {x.dtype}{list(x.shape)} in {a}, {y.dtype}{list(y.shape)} in {b}")
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def io_floor(a: Path, b: Path, out: Path) -> float:
    """Read both files completely and write one file of the first one's size: the least a merge must do."""
    bufs = [bytearray(BLOCK), bytearray(BLOCK)]
    views = [memoryview(x) for x in bufs]
    t0 = time.perf_counter()
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb, open(out, "wb", buffering=0) as fo:
        while n := fa.readinto(views[0]):
            fb.readinto(views[1])
            fo.write(views[0][:n])
    return time.perf_counter() - t0


def ours_one(text: Path, mm: Path, out: Path, alpha: float) -> float:
    from vlmerge.merge.core import merge_to_disk

    t0 = time.perf_counter()
    merge_to_disk(text, mm, out, "linear", [alpha])
    return time.perf_counter() - t0


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=str(REPO / ".venv-peers"), help="the peer venv with mergekit (make peers)")
    ap.add_argument("--skip-mergekit", action="store_true", help="measure only ours against the I/O floor and memory")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many for the one-alpha timings")
    ap.add_argument("--alpha", type=float, default=0.3, help="the alpha of the one-alpha and memory runs")
    ap.add_argument("--intermediate", type=int, default=1760, help="MLP width (1760 gives ~63M parameters)")
    ap.add_argument("--threads", type=int, help="torch/OpenMP threads for every side (default: torch's, one a core)")
    ap.add_argument("--tmp", help="folder for the temp dir (default: the system's)")
    args = ap.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    mergekit = Path(args.peers) / "bin" / "mergekit-yaml"
    if not args.skip_mergekit and not mergekit.is_file():
        sys.exit(f"bench_merge: no mergekit at {mergekit}: run `make peers` first, or pass --skip-mergekit "
                 "(then the sweep ratio and the agreement with mergekit are not measured)")
    threads = ENV.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    vlmerge = [sys.executable, "-m", "vlmerge", "merge", "--method", "linear", "--quiet"]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-merge-", dir=args.tmp) as d:
        tmp = Path(d)
        result = tmp / "result.json"
        text, mm, n_params = make_pair(tmp, args.intermediate)
        pair = ["--text", str(text), "--mm", str(mm)]
        size = (text / "model.safetensors").stat().st_size
        with safe_open(text / "model.safetensors", framework="pt") as st:
            shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
        largest = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
        os.sync()

        # One alpha in-process against the I/O floor, interleaved, best of --repeats.
        ours_one(text, mm, tmp / "warm", args.alpha)  # imports, git lookup for the record: not timed
        shutil.rmtree(tmp / "warm")
        floor_s, one_s = [], []
        for _ in range(args.repeats):
            floor_s.append(io_floor(text / "model.safetensors", mm / "model.safetensors", tmp / "floor.bin"))
            (tmp / "floor.bin").unlink()
            one_s.append(ours_one(text, mm, tmp / "one", args.alpha))
            shutil.rmtree(tmp / "one")

        # Memory of one alpha through the CLI; start-up alone (`--help` exits before merging).
        start_s, start_rss, start_peaks = run(vlmerge + ["--help"], "vlmerge merge --help", result, sample=True)
        mem_s, mem_rss, peaks = run(vlmerge + pair + ["--alpha", str(args.alpha), "--out", str(tmp / "mem")],
                                    "vlmerge merge (one alpha)", result, sample=True)
        shutil.rmtree(tmp / "mem")

        # The sweep: ours (one process, 11 outputs) against mergekit (11 processes), then agreement.
        alphas = ",".join(str(a) for a in ALPHAS)
        sweep_s, sweep_rss, _ = run(vlmerge + pair + ["--alpha", alphas, "--out", str(tmp / "ours")],
                                    "vlmerge merge (11 alphas)", result)
        os.sync()
        mk_s, mk_rss, diffs = [], [], {}
        if not args.skip_mergekit:
            for a in ALPHAS:
                cfg = mergekit_config(tmp / f"mergekit-{a:.2f}.yml", text, mm, a)
                s, rss, _ = run([str(mergekit), str(cfg), str(tmp / f"mergekit-{a:.2f}"), *MERGEKIT_OPTIONS],
                                f"mergekit-yaml (alpha {a})", result)
                mk_s.append(s)
                mk_rss.append(rss)
            diffs = {a: max_abs_diff(tmp / "ours" / f"alpha-{a:.2f}", tmp / f"mergekit-{a:.2f}") for a in ALPHAS}

    print(f"merge: {n_params / 1e6:.1f}M-parameter LlamaForCausalLM pair (6 layers, hidden 768, vocab 16000, "
          f"untied), float32, {size / 2**20:.0f} MiB each; {os.cpu_count()} cores, {threads} threads, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("  sweep, 11 alphas 0..1 to disk (subprocesses, start-up included):")
    print(f"    vlmerge merge, one run            : {sweep_s:8.2f} s    (start-up alone: {start_s:.2f} s)")
    if args.skip_mergekit:
        print("    mergekit, 11 runs                 :  SKIPPED (--skip-mergekit): no ratio, no agreement check")
    else:
        mk = sum(mk_s)
        print(f"    mergekit-yaml, 11 runs            : {mk:8.2f} s    ({min(mk_s):.2f}..{max(mk_s):.2f} s a run; "
              f"{' '.join(MERGEKIT_OPTIONS)})")
        print(f"    ratio (mergekit / ours)           : {mk / sweep_s:8.2f}x    (goal >= 10x)")
    floor, one = min(floor_s), min(one_s)
    print(f"  one alpha ({args.alpha}) to disk, in-process, best of {args.repeats}:")
    print(f"    I/O floor (read both, write one)  : {floor:8.3f} s    ({3 * size / floor / 2**30:.1f} GiB/s)")
    print(f"    merge_to_disk                     : {one:8.3f} s")
    print(f"    ratio (ours / floor)              : {one / floor:8.2f}x    (goal <= 2x)")
    print(f"  memory, one alpha through the CLI ({mem_s:.1f} s):")
    print(f"    max RSS, vlmerge merge            : {mib(mem_rss)}")
    print(f"      anonymous, peak                 : {mib(peaks['RssAnon'])}  "
          f"(start-up alone: {mib(start_peaks['RssAnon']).strip()})")
    print(f"      file-backed, peak               : {mib(peaks['RssFile'])}  "
          f"(start-up alone: {mib(start_peaks['RssFile']).strip()}; the rest: the memory-mapped inputs)")
    print(f"    max RSS, start-up alone (--help)  : {mib(start_rss)}")
    print(f"    max RSS, 11-alpha run             : {mib(sweep_rss)}")
    if mk_rss:
        print(f"    max RSS, mergekit (worst run)     : {mib(max(mk_rss))}")
    print(f"    model on disk (one input)         : {mib(size)}")
    print(f"    largest tensor                    : {mib(4 * torch.Size(shapes[largest]).numel())}  "
          f"({largest} {list(shapes[largest])}, float32)")
    if diffs:
        worst = max(diffs.values())
        print("  max |ours - mergekit| by alpha      : " + " ".join(f"{a}:{v:.0e}" for a, v in diffs.items()))
        print(f"    worst                             : {worst:8.1e}    (goal <= 1e-6)")
        if worst > 1e-6:
            sys.exit("bench_merge: ours and mergekit disagree beyond 1e-6")


if __name__ == "__main__":
    main()
