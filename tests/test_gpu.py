"""The CUDA paths, each against the CPU's fp32 result of the same work: merging on the device, the
scorer (pinned batches, fp32 without TF32, bf16), a sweep item, Grams, distances, precompute in fp16,
and DeepSpeed training in fp16 and bf16 (NCCL) with a resume. Run where a GPU is present; skipped
with one line where none is. `make gpu-check` is the timed, end-to-end counterpart."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, SMALL_WORLD, vlmerge_cli

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible (a CPU build of torch, or no driver): the CUDA paths' tests need one",
                allow_module_level=True)

from test_scoring import blimp_sentences, setup  # noqa: E402,F401  (the fixture: a small model and its data)


def test_a_gpu_device_turns_tf32_off_and_becomes_current():
    from vlmerge.device import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = True
    device = resolve_device("cuda")
    assert device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_scores_on_the_gpu_equal_the_cpu_fp32_scores(setup, real_blimp):
    import copy

    from vlmerge.evaluate.scoring import Scorer
    from vlmerge.evaluate.tasks import Request

    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp, 40)
    requests = [Request(s, group=i // 2) for i, s in enumerate(sentences)]
    cpu = Scorer(copy.deepcopy(model), tokenizer, features=features).score(requests).logprob
    gpu = Scorer(copy.deepcopy(model).cuda(), tokenizer, features=features)
    prepared = gpu.prepare(requests)
    assert all(b.ids.is_pinned() for b in prepared.batches)  # copied to the device without blocking
    np.testing.assert_allclose(gpu.score(prepared).logprob, cpu, rtol=0, atol=2e-4)
    bf16 = Scorer(copy.deepcopy(model).cuda(), tokenizer, features=features, dtype="bf16").score(requests).logprob
    assert np.mean((cpu[::2] >= cpu[1::2]) == (bf16[::2] >= bf16[1::2])) >= 0.95  # the pairs' decisions


@pytest.mark.parametrize("method, params", [("linear", {}), ("task_arithmetic", {"lam": 1.5}), ("ties", {}),
                                            ("dare", {"p": 0.3}), ("slerp", {}), ("regmean", {})])
def test_merging_in_place_on_the_gpu_equals_the_cpu_merge(method, params):
    from vlmerge.merge.core import resolve
    from vlmerge.merge.methods import TensorInputs

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 16, generator=g, dtype=torch.float64)
    inputs = TensorInputs.twins("layers.0.w", *(torch.randn(8, 16, generator=g) for _ in range(3)),
                                statistics={"grams": (xs.T @ xs, 2 * xs.T @ xs)})

    class OnePair:  # what `resolve` reads of a Pair
        base = True

    for alpha in (0.25, 0.6):
        m, full = resolve(method, params, OnePair(), [inputs])
        on_cpu = m.merge(inputs, alpha, full)
        m, full = resolve(method, params, OnePair(), [inputs.to("cuda")])
        on_gpu = m.merge(inputs.to("cuda"), alpha, full)
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-5)


def test_a_sweep_on_the_gpu_gives_the_cpu_sweeps_results(twins, tmp_path):
    from vlmerge.results import DEDUPE, read_results

    sweep = [*SMALL_WORLD, *FAST_TRAIN, "sweep.alphas=[0.0, 0.3, 1.0]", "sweep.tasks=[blimp, winoground, vqa]",
             "sweep.methods=[{name: linear}, {name: ties}]", "checkpoints.words=[2000]"]
    values = {}
    for device in ("cpu", "cuda"):
        root = tmp_path / device
        subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
        r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *sweep, f"compute.device={device}")
        assert r.returncode == 0, r.stderr
        values[device] = read_results(root / "results/demo").set_index(["item_id", *DEDUPE["metrics"]]).value.sort_index()
    assert values["cuda"].index.equals(values["cpu"].index)
    close = np.isclose(values["cuda"].to_numpy(), values["cpu"].to_numpy(), rtol=0, atol=0.02)
    assert close.mean() >= 0.99  # accuracies of a few hundred items: a near-tie may flip


def test_grams_and_distances_on_the_gpu_equal_the_cpus(twins, tmp_path):
    from safetensors.torch import load_file

    from vlmerge.config import load_config
    from vlmerge.layout import list_checkpoints, statistics_file
    from vlmerge.merge.distance import distances
    from vlmerge.merge.statistics import write_statistics
    from vlmerge.merge.io import ModelDir

    grams = {}
    for device in ("cpu", "cuda"):
        root = tmp_path / device
        subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
        cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, f"compute.device={device}"])
        ckpt = list_checkpoints(cfg.layout.run_dir("text"))[-1]
        write_statistics(cfg, ckpt, ["grams"])
        grams[device] = load_file(statistics_file(ckpt, "grams"))
    for name, g in grams["cpu"].items():
        torch.testing.assert_close(grams["cuda"][name], g, rtol=1e-6, atol=1e-6)
    text, mm = (ModelDir(list_checkpoints(twins / f"runs/demo/{run}")[-1]) for run in ("text", "multimodal"))
    on_cpu, on_gpu = distances(text, mm), distances(text, mm, device="cuda")
    for scope, values in on_cpu.items():
        for metric, v in values.items():
            assert on_gpu[scope][metric] == pytest.approx(v, rel=1e-9, abs=1e-12), (scope, metric)


def test_precompute_in_fp16_on_the_gpu_is_the_fp32_feature(make_cfg):
    import h5py

    stores = {}
    for precision in ("fp32", "fp16"):
        cfg = make_cfg(f"features.name=gpu-{precision}", f"features.precision={precision}", "features.device=cuda",
                       "features.images=[{manifest: '{root}/demo/eval/images.jsonl'}]")
        from vlmerge.precompute.features import precompute

        precompute(cfg)
        with h5py.File(cfg.store_path) as f:
            stores[precision] = f["features"][:].astype(np.float32)
    np.testing.assert_allclose(stores["fp16"], stores["fp32"], rtol=0, atol=5e-2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_on_the_gpu_with_deepspeed_resumes_where_it_stopped(fresh_root, precision):
    from safetensors.torch import load_file

    from test_train import metrics, stop_midway, train_on
    from vlmerge.layout import list_checkpoints

    extra = [f"train.precision={precision}"]
    straight, stopped = fresh_root(), fresh_root()
    first = train_on(straight, 1, extra=extra)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert stop_midway(train_on(stopped, 1, extra=extra), stopped, 1) >= 30
    resumed = train_on(stopped, 1, extra=extra)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert [r["data"] for r in metrics(stopped)] == [r["data"] for r in metrics(straight)]
    assert metrics(straight)[-1]["loss"] < metrics(straight)[0]["loss"]  # it learns in half precision
    a, b = (list_checkpoints(root / "runs/demo/text") for root in (straight, stopped))
    assert [c.name for c in a] == [c.name for c in b]
    last_a, last_b = load_file(a[-1] / "model.safetensors"), load_file(b[-1] / "model.safetensors")
    for name, w in last_a.items():  # CUDA's atomics make the sums' order, not the run, differ
        torch.testing.assert_close(last_b[name], w, rtol=0, atol=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two GPUs: the two-rank NCCL run needs two")
def test_two_gpus_train_data_parallel_over_nccl(fresh_root):
    import json
    import sys

    root = fresh_root()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "vlmerge", "--", "train", "--quiet", "--run", "text", f"paths.root={root}", *SMALL_WORLD,
                        *FAST_TRAIN, "train.precision=bf16", "train.check_replicas=true", "train.micro_batch_size=4",
                        "train.global_batch=8"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (root / "runs/demo/text/metrics.jsonl").read_text().splitlines()]
    assert all(len(set(row["replica_digests"])) == 1 for row in rows)
