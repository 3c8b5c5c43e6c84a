"""Devices on the CPU side: which device a setting picks, batches sized by tokens, one sweep worker
per visible GPU, and each training rank's GPU. (The CUDA paths themselves: tests/test_gpu.py.)"""

from __future__ import annotations

import re

import pytest
import torch

from vlmerge.config import ConfigError, load_config
from vlmerge.device import pick_device
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.scoring import batch_limits, group_batches
from vlmerge.launch import visible_gpus, worker_envs
from vlmerge.sweep.plan import WorkItem, worker_share
from vlmerge.train.distributed import local_gpu

from test_scoring import setup  # noqa: F401  (the fixture: a small model, its tokenizer and features)


@pytest.mark.parametrize("spec, gpus, device", [("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"),
                                                ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1")])
def test_a_device_setting_picks_the_gpu_when_there_is_one(spec, gpus, device):
    assert pick_device(spec, gpus) == device


@pytest.mark.parametrize("spec, gpus, says", [
    ("cuda", 0, "compute.device cuda: no CUDA GPU is visible to this process"),
    ("cuda:2", 2, "compute.device cuda:2: this process sees 2 GPU(s), cuda:0 … cuda:1"),
])
def test_a_gpu_that_is_not_there_is_a_one_line_error(spec, gpus, says):
    with pytest.raises(VlmergeError, match=re.escape(says)):
        pick_device(spec, gpus)


@pytest.mark.parametrize("key", ["compute.device", "features.device"])
def test_a_device_setting_is_validated_with_the_config(key):
    assert load_config(None, [f"{key}=cuda:3"])  # a GPU index is checked where it is used
    with pytest.raises(ConfigError, match=f"{key}: Value error, expected auto, cpu, cuda or cuda:N"):
        load_config(None, [f"{key}=gpu"])


def test_batches_take_whole_groups_within_the_request_and_token_limits():
    # (requests, row lengths) per group, longest rows first, as the scorer orders them
    groups = [(2, [10]), (2, [9]), (3, [8, 8]), (1, [3]), (2, [3])]
    assert group_batches(groups, None, None) == [[0, 1, 2, 3, 4]]
    assert group_batches(groups, 4, None) == [[0, 1], [2, 3], [4]]
    # tokens = rows × the batch's longest row: 10, 20, 40 > 30 -> close; 16, 24, 32 > 30 -> close
    assert group_batches(groups, None, 30) == [[0, 1], [2, 3], [4]]
    assert group_batches([(5, [50])], 2, 30) == [[0]]  # a group over both limits is a batch of its own


def test_auto_batch_limits_depend_on_the_device():
    assert batch_limits(torch.device("cpu"), "auto", "auto") == (64, 16384)
    assert batch_limits(torch.device("cuda", 0), "auto", "auto") == (None, 65536)
    assert batch_limits(torch.device("cpu"), 8, 100) == (8, 100)


def test_the_scorer_keeps_batches_within_the_token_budget_and_the_scores(setup, real_blimp):
    from test_scoring import blimp_sentences

    from vlmerge.evaluate.scoring import Scorer
    from vlmerge.evaluate.tasks import Request

    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp, 10)
    requests = [Request(s, group=i // 2) for i, s in enumerate(sentences)]  # each pair one group
    wide = Scorer(model, tokenizer, features=features, batch_size=10**6, batch_tokens=10**9)
    tight = Scorer(model, tokenizer, features=features, batch_size=10**6, batch_tokens=200)
    prepared = tight.prepare(requests)
    assert len(wide.prepare(requests).batches) == 1 and len(prepared.batches) > 5
    for b in prepared.batches:
        groups = {requests[q].group for q in b.requests.tolist()}
        assert b.ids.numel() <= 200 or len(groups) == 1  # within the budget, or one group alone
    assert torch.allclose(torch.tensor(tight.score(prepared).logprob), torch.tensor(wide.score(requests).logprob),
                          atol=1e-4)


def test_each_sweep_worker_sees_one_of_the_visible_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "3,GPU-7f2a,5"}
    assert visible_gpus(2, env) == ["3", "GPU-7f2a"]  # CUDA stops at the GPUs it could open
    assert visible_gpus(2, {}) == ["0", "1"]
    workers = worker_envs("auto", "auto", 3, env)
    assert [w["CUDA_VISIBLE_DEVICES"] for w in workers] == ["3", "GPU-7f2a", "5"]
    assert [w["CUDA_VISIBLE_DEVICES"] for w in worker_envs(4, "cuda", 2, env)] == ["3", "GPU-7f2a", "3", "GPU-7f2a"]
    assert len(worker_envs("auto", "cuda:1", 3, env)) == 1  # a named GPU: one worker on it
    assert len(worker_envs("auto", "cpu", 3, env)) == 1 and "CUDA_VISIBLE_DEVICES" not in {
        k for w in worker_envs(2, "cpu", 0, {}) for k in w}


def test_cpu_workers_share_the_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [w["OMP_NUM_THREADS"] for w in worker_envs(3, "cpu", 0, {})] == ["2", "2", "2"]
    assert [w["OMP_NUM_THREADS"] for w in worker_envs(2, "cpu", 0, {"SLURM_CPUS_PER_TASK": "2"})] == ["1", "1"]


def test_workers_share_the_items_with_each_pair_on_one_worker():
    def item(text: str, mm: str, method: str, alphas: int) -> WorkItem:
        return WorkItem(text, mm, method, "{}", tuple(range(alphas)), None, "s")

    items = [item("t1", "m1", "linear", 11), item("t1", "m1", "ties", 11), item("t2", "m2", "linear", 11),
             item("t3", "m3", "linear", 11), item("t3", "m3", "ties", 1)]
    shares = [worker_share(items, k, 2) for k in range(2)]
    assert sorted((it for share in shares for it in share), key=items.index) == items  # each item once
    assert [[(it.text, it.method) for it in share] for share in shares] == [
        [("t1", "linear"), ("t1", "ties")], [("t2", "linear"), ("t3", "linear"), ("t3", "ties")]]


@pytest.mark.parametrize("local_rank, visible, gpu", [(1, 1, 0), (1, 2, 1), (0, 4, 0)])
def test_each_training_rank_takes_its_own_gpu(local_rank, visible, gpu):
    assert local_gpu(local_rank, visible) == gpu


def test_a_rank_without_a_gpu_of_its_own_is_a_one_line_error():
    with pytest.raises(VlmergeError, match="local rank 2 but this process sees 2 GPU"):
        local_gpu(2, 2)
