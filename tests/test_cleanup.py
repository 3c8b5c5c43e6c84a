"""Nothing left behind: a stage's next run removes the temp files its killed runs left in its own
folders, and nothing else; `results compact` touches only the sweep's files, one run at a time;
outputs get the modes the user's umask allows; a lock file is held by one process at a time, and a
dead holder's is taken over."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from vlmerge.analysis.run import analyze
from vlmerge.cli import main
from vlmerge.demo.world import save_random_dinov2
from vlmerge.errors import VlmergeError
from vlmerge.io import FOREIGN_TEMP_STALE_S, HOST, atomic_path, remove_stale_temps, temp_sibling
from vlmerge.locks import STALE_AFTER_S, hold
from vlmerge.layout import store_config, store_shard_dir
from vlmerge.merge.core import merge_to_disk
from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, compact, read_results, write_rows

from conftest import REPO, SMALL_WORLD, stale_temp
from test_analysis import OPTIONS, write_results
from test_errors import _tiny_lm


# -- the helper ---------------------------------------------------------------------------------------

def test_only_temp_names_of_writers_that_are_gone_are_removed(tmp_path):
    dead = stale_temp(tmp_path / "a.parquet")
    dead_dir = stale_temp(tmp_path / "alpha-0.50", is_dir=True)
    legacy = tmp_path / ".b.parquet.tmp-999999999-0123abcd"  # an older version's name, no host
    legacy.write_bytes(b"x")
    live = temp_sibling(tmp_path / "c.parquet")  # this very process: a write in progress
    live.write_bytes(b"x")
    other_host_recent = tmp_path / ".d.parquet.tmp-elsewhere-12-0123abcd"
    other_host_old = tmp_path / ".e.parquet.tmp-elsewhere-12-0123abcd"
    for p in (other_host_recent, other_host_old):
        p.write_bytes(b"x")
    old = time.time() - FOREIGN_TEMP_STALE_S - 60
    os.utime(other_host_old, (old, old))
    users = [tmp_path / name for name in (".a.parquet.tmp-notes", "a.parquet", ".hidden", "x.tmp-1-2")]
    for p in users:
        p.write_bytes(b"mine")

    removed = remove_stale_temps(tmp_path, tmp_path / "absent")
    assert sorted(removed) == sorted([dead, dead_dir, legacy, other_host_old])
    assert live.exists() and other_host_recent.exists() and all(p.read_bytes() == b"mine" for p in users)


def test_outputs_follow_the_umask_even_when_the_writer_makes_0600_files(tmp_path):
    from safetensors.torch import save_file

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "ckpt", is_dir=True) as tmp:
            save_file({"a": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors creates 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt" / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750


# -- merge --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    return _tiny_lm(d / "text", 1), _tiny_lm(d / "mm", 2)


def test_merge_removes_its_killed_runs_temp_folders_and_writes_no_hash_into_its_inputs(pair, tmp_path):
    text, mm = pair
    out = tmp_path / "sweep"
    left = [stale_temp(out / "alpha-0.50", is_dir=True), stale_temp(tmp_path / "single", is_dir=True)]
    foreign = out / "notes.txt"
    foreign.write_text("mine")
    inputs_before = sorted(p.name for p in text.iterdir())
    merge_to_disk(text, mm, out, "linear", [0.0, 0.5])
    merge_to_disk(text, mm, tmp_path / "single", "linear", [0.5])
    assert not any(p.exists() for p in left) and foreign.read_text() == "mine"
    assert sorted(p.name for p in text.iterdir()) == inputs_before  # no .sha256 cache in an input folder


def test_sigkill_in_merges_write_window_then_rerun_leaves_no_temp(tmp_path):
    text, mm = _tiny_lm(tmp_path / "text", 1, hidden_size=256, intermediate_size=1024), \
        _tiny_lm(tmp_path / "mm", 2, hidden_size=256, intermediate_size=1024)
    out = tmp_path / "out"
    alphas = ",".join(f"{a / 20:.2f}" for a in range(21))
    cmd = [sys.executable, "-m", "vlmerge", "merge", "--quiet", "--text", str(text), "--mm", str(mm),
           "--alpha", alphas, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(".tmp-" in p.name for p in out.iterdir())):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(".tmp-" in p.name for p in out.iterdir())  # the kill landed in the write window
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"alpha-{a / 20:.2f}" for a in range(21)]


# -- eval ---------------------------------------------------------------------------------------------

def test_eval_removes_the_temp_files_of_its_killed_runs(pair, tmp_path, real_blimp, capsys):
    text, _ = pair
    blimp = tmp_path / "blimp"
    blimp.mkdir()
    first = sorted(real_blimp.glob("*.jsonl"))[0]
    (blimp / first.name).write_text("".join(first.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "eval"
    left = stale_temp(out / "results.parquet")
    assert main(["eval", "--quiet", "--model", str(text), "--task", f"blimp={blimp}", "--out", str(out),
                 f"paths.root={tmp_path / 'root'}"]) == 0
    assert not left.exists()
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "items.parquet", "results.parquet"]


# -- precompute ---------------------------------------------------------------------------------------

def test_precompute_cleans_up_and_finishes_an_interrupted_link(tmp_path, capsys):
    enc = save_random_dinov2(tmp_path / "enc", 0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)
    np.save(tmp_path / "part.npy", np.ones((3, 32), dtype=np.float32))
    (tmp_path / "captions.json").write_text('["a", "b", "c"]')
    root = tmp_path / "out"
    argv = ["precompute", "--quiet", f"paths.root={root}", f"features.encoder={enc}", "features.images=[]",
            "features.name=imp", "features.num_workers=0",
            f"features.imports=[{{captions: '{tmp_path}/captions.json', npy: ['{tmp_path}/part.npy'], prefix: cc, "
            f"encoder: '{enc}', layer: -2, pooling: mean_patch}}]"]
    store = root / "features/imp.h5"
    left = [stale_temp(store), stale_temp(store_shard_dir(store) / "imp-00000-of-00001.h5")]
    foreign = root / "features/readme.txt"
    foreign.write_text("mine")
    assert main(argv) == 0
    assert not any(p.exists() for p in left) and foreign.read_text() == "mine"
    assert store.is_file() and store_config(store).is_file() and not store_shard_dir(store).exists()

    # Killed right after the store's rename: shards still there, no config beside the store.
    store_config(store).unlink()
    store_shard_dir(store).mkdir()
    (store_shard_dir(store) / "imp-00000-of-00001.h5").write_bytes(b"shard")
    stored = store.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "is complete" in capsys.readouterr().out
    assert store_config(store).is_file() and not store_shard_dir(store).exists() and store.read_bytes() == stored


# -- demo-data, tokenizer, corpus, analyze ------------------------------------------------------------

def test_the_data_stages_remove_the_temps_of_their_killed_runs(small_prepared, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_prepared, root, symlinks=True)
    left = [stale_temp(root / "demo", is_dir=True), stale_temp(root / "runs/demo/tokenizer", is_dir=True),
            stale_temp(root / "runs/demo/corpus/text", is_dir=True), stale_temp(root / "runs/demo/corpus/config.yaml")]
    foreign = [root / "notes.txt", root / "runs/demo/notes.txt", root / "runs/demo/corpus/notes.txt"]
    for f in foreign:
        f.write_text("mine")
    for stage in ("demo-data", "tokenizer", "corpus"):
        assert main([stage, "--quiet", f"paths.root={root}", *SMALL_WORLD]) == 0
    assert not any(p.exists() for p in left) and all(f.read_text() == "mine" for f in foreign)


def test_analyze_removes_the_temps_of_its_killed_runs(tmp_path):
    write_results(tmp_path)
    out = tmp_path / "report"
    left = [stale_temp(out / "figures/curve.png"), stale_temp(out / "report.html")]
    foreign = out / "figures/mine.png"
    foreign.write_bytes(b"mine")
    analyze([tmp_path / "results/synth"], out, OPTIONS)
    assert not any(p.exists() for p in left) and foreign.read_bytes() == b"mine"


# -- results compact ----------------------------------------------------------------------------------

def _part(results: Path, dataset: str, item_id: str, value: float) -> Path:
    schema = RESULTS_SCHEMA if dataset == "metrics" else ITEMS_SCHEMA
    row = {"experiment": "demo", "item_id": item_id, "text_run": "text", "mm_run": "multimodal", "text_words": 10,
           "mm_words": 10, "method": "linear", "alpha": 0.5, "method_params": "{}", "task": "blimp",
           "subtask": "s", "value": value}
    row |= {"metric": "accuracy", "n": 1, "created_at": "2026"} if dataset == "metrics" else {"example_id": "e1"}
    path = results / dataset / f"{item_id}.parquet"
    write_rows([row], schema, path)
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    results = tmp_path / "results/demo"
    for i in range(4):
        _part(results, "metrics", f"item{i}", i / 10)
    return results


def test_compact_leaves_foreign_parquet_files_alone(results):
    foreign = [results / "metrics/mine.parquet", results / "metrics/other-sweep.parquet"]
    pq.write_table(pa.table({"x": [1, 2]}), foreign[0])  # not the schema
    _part(results, "metrics", "other-sweep", 0.9)  # the schema, but not an item of this sweep
    before = {f: f.read_bytes() for f in foreign}
    planned = {f"item{i}" for i in range(4)}
    files, rows, left = compact(results, "metrics", planned)
    assert (files, rows) == (4, 4) and sorted(left) == sorted(foreign)
    assert {f: f.read_bytes() for f in foreign} == before
    compacted = [p for p in (results / "metrics").glob("compact-*.parquet")]
    assert len(compacted) == 1
    values = pq.read_table(compacted[0]).column("value").to_pylist()
    assert sorted(values) == [0.0, 0.1, 0.2, 0.3]  # no all-null row from a file of another shape
    # A later item joins the compacted one at the next run; the foreign files still stay.
    _part(results, "metrics", "item4", 0.4)
    files, rows, left = compact(results, "metrics", planned | {"item4"})
    assert (files, rows) == (2, 5) and sorted(left) == sorted(foreign)


def test_two_concurrent_compactions_both_succeed(results):
    planned = {f"item{i}" for i in range(4)}
    outcomes, errors = [], []

    def run():
        try:
            outcomes.append(compact(results, "metrics", planned))
        except Exception as e:  # noqa: BLE001 - the test reports whatever a compaction raised
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outcomes) == 2
    assert sorted(o[0] for o in outcomes) == [1, 4]  # the second waited, then found one file
    assert len(list((results / "metrics").glob("*.parquet"))) == 1
    assert len(read_results(results)) == 4


# -- lock files (vlmerge.locks): one holder at a time, on NFS too ----------------------------------------

def _plant_lock(path: Path, host: str, pid: int, age_s: float = 0.0, **job: object) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "earlier", "what": "someone", "token": "t"} | job))
    then = time.time() - age_s
    os.utime(path, (then, then))


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_a_live_holders_lock_is_refused_in_one_line_and_a_dead_ones_taken_over(tmp_path):
    lock = tmp_path / "run" / "train.lock"
    with hold(lock, "first") as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(VlmergeError) as refused:
            with hold(lock, "second"):
                pass
    message = str(refused.value)
    assert "\n" not in message and str(lock) in message and f"host {HOST}, pid {os.getpid()}" in message
    assert not lock.exists()  # released

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = [(HOST, os.getppid(), 0.0), ("elsewhere", 1, 0.0)]  # a live pid; another host's fresh lock
        stale = [(HOST, _dead_pid(), 0.0), ("elsewhere", 1, STALE_AFTER_S + 60),
                 (HOST, sleeper.pid, 3600.0)]  # the pid of a process started after the lock was last touched
        for host, pid, age in live:
            _plant_lock(lock, host, pid, age)
            with pytest.raises(VlmergeError, match=f"host {host}, pid {pid}"):
                with hold(lock, "second"):
                    pass
        for host, pid, age in stale:
            _plant_lock(lock, host, pid, age)
            with hold(lock, "taker") as held:
                assert json.loads(held.read_text())["what"] == "taker"
        lock.write_text("")  # an older vlmerge's empty lock file, long untouched
        os.utime(lock, (0, 0))
        with hold(lock, "taker"):
            pass
    finally:
        sleeper.kill()
    assert sorted(p.name for p in lock.parent.iterdir()) == []  # no renamed stale lock left either


_RACE = """
import pathlib, sys, time
from vlmerge.errors import VlmergeError
from vlmerge.locks import hold
lock, go, release = map(pathlib.Path, sys.argv[1:])
while not go.exists():
    time.sleep(0.001)
try:
    with hold(lock, "racer"):
        print("won", flush=True)
        while not release.exists():  # held until every racer has tried
            time.sleep(0.01)
except VlmergeError:
    print("refused", flush=True)
"""


def test_a_lock_of_an_earlier_start_of_the_same_slurm_job_is_taken_over_from_any_host(tmp_path):
    """A job requeued after losing the node that held its lock must not wait for that node."""
    lock = tmp_path / "train.lock"
    for holder in ({"job": "76", "start": 0}, {"job": "77", "start": 1}, {}):  # another job; this very start
        _plant_lock(lock, "lost-node", 1, **holder)
        with pytest.raises(VlmergeError, match="host lost-node"):
            with hold(lock, "second", job=("77", 1)):
                pass
    _plant_lock(lock, "lost-node", 1, job="77", start=0)
    with hold(lock, "requeued", job=("77", 1)) as held:
        assert json.loads(held.read_text()) | {"job": "77", "start": 1} == json.loads(held.read_text())


def test_racers_on_a_stale_lock_exactly_one_wins(tmp_path):
    lock = tmp_path / "train.lock"
    # Threads of one process...
    for _ in range(5):
        _plant_lock(lock, HOST, _dead_pid())
        barrier, release, outcomes = threading.Barrier(6), threading.Event(), []

        def race():
            barrier.wait()
            try:
                with hold(lock, "racer"):
                    outcomes.append("won")
                    release.wait(60)  # held until every racer has tried
            except VlmergeError:
                outcomes.append("refused")

        threads = [threading.Thread(target=race) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(outcomes) < 6 and time.time() < deadline:
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    # ...and processes, let go together.
    _plant_lock(lock, HOST, _dead_pid())
    go, release = tmp_path / "go", tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(lock), str(go), str(release)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(4)]
    time.sleep(1)
    go.touch()
    outcomes = sorted(p.stdout.readline().strip() for p in procs)
    release.touch()
    for p in procs:
        p.communicate(timeout=60)
    assert outcomes == ["refused"] * 3 + ["won"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "release"]  # the lock released, no guard left
