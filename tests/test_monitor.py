"""`train.monitor`: TensorBoard event files (and W&B offline runs) that hold metrics.jsonl's rows, each
step once, also after a kill and a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from vlmerge.cli import main
from vlmerge.config import load_config
from vlmerge.layout import (run_metrics_log, run_tensorboard_dir, run_wandb_dir, states_dir, tensorboard_event_files,
                            wandb_offline_runs)

from conftest import FAST_TRAIN, SMALL_WORLD, vlmerge_cli

CURVES = {"loss", "lr", "words", "tokens", "words_per_s", "tokens_per_s", "epoch"}
# One short training: a few steps, one state, one checkpoint.
SHORT = ("train.epochs=1", "checkpoints.words=[1000]", "train.log_every=1")


def train_cmd(root: Path, *extra: str) -> list[str]:
    return ["train", "--quiet", "--run", "text", f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, *extra]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in run_metrics_log(run_dir).read_text().splitlines()]


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Each curve of metrics.jsonl: (step, value as TensorBoard stores it (float32), the row's time)."""
    curves: dict[str, list] = {}
    for row in rows:
        for name in CURVES & row.keys():
            curves.setdefault(name, []).append((row["step"], float(np.float32(row[name])), row["time"]))
    return curves


def on_disk(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar event of every event file of the run, file after file: a step written twice shows twice."""
    curves: dict[str, list] = {}
    for path in tensorboard_event_files(run_tensorboard_dir(run_dir)):
        for event in LegacyEventFileLoader(str(path)).Load():  # the events as written
            for value in event.summary.value:
                curves.setdefault(value.tag, []).append((event.step, value.simple_value, event.wall_time))
    return curves


def shown(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """What TensorBoard shows of the run's folder (its own reader, with its purge of restarted runs)."""
    acc = EventAccumulator(str(run_tensorboard_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_demo_training_leaves_event_files_whose_scalars_equal_metrics_jsonl(twins):
    for run in ("text", "multimodal"):  # the demo config's train.monitor: [tensorboard]
        run_dir = twins / "runs/demo" / run
        want = expected(rows_of(run_dir))
        assert want.keys() == CURVES and len(want["loss"]) > 20
        assert on_disk(run_dir) == want
        assert shown(run_dir) == want


@pytest.mark.slow
def test_a_run_killed_past_its_state_and_resumed_holds_each_step_once(fresh_root):
    root = fresh_root()
    run_dir = root / "runs/demo/text"
    extra = ("checkpoints.state_every_steps=5",)
    proc = subprocess.Popen([sys.executable, "-m", "vlmerge", *train_cmd(root, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = run_metrics_log(run_dir), time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        n = len(log.read_text().splitlines()) if log.is_file() else 0
        if n >= 12 and n % 5 in (2, 3):  # between two states: steps logged past the last one
            proc.send_signal(signal.SIGKILL)  # no chance to save or flush anything
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    saved = json.loads((states_dir(run_dir) / (states_dir(run_dir) / "latest").read_text().strip()
                        / "state.json").read_text())["step"]
    killed = on_disk(run_dir)
    assert max(step for step, *_ in killed["loss"]) > saved  # the kill left steps the resume does again

    r = vlmerge_cli(*train_cmd(root, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(run_dir)
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    want = expected(rows)
    assert on_disk(run_dir) == want  # each step once, with metrics.jsonl's values and times
    assert shown(run_dir) == want


def test_the_monitors_do_not_change_a_runs_fingerprint():
    # A run started without a monitor continues with one (and the runs of before train.monitor with it).
    from vlmerge.train.loop import _run_fingerprint

    prints = {_run_fingerprint(load_config(None, [m]), "text")
              for m in ("train.monitor=[]", "train.monitor=[tensorboard]", "train.monitor=[tensorboard, wandb]")}
    assert len(prints) == 1


def test_wandb_chosen_but_not_importable_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed (import wandb raises ImportError)
    code = main(train_cmd(tmp_path, "train.monitor=[tensorboard, wandb]"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in ("vlmerge train: error: ", "train.monitor", "wandb", "pip install wandb")), err
    assert not (tmp_path / "runs").exists()


def wandb_history(offline_run: Path) -> list[dict]:
    """The history rows of a W&B offline run, read with W&B's own reader of its .wandb log."""
    (log,) = offline_run.glob("run-*.wandb")
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return [rec["history"]["item"] for rec in records if rec.get("type") == "history"]


def test_wandb_offline_run_holds_metrics_jsonl_and_a_rerun_replaces_it(fresh_root):
    pytest.importorskip("wandb", reason="wandb is optional and not installed here (pip install wandb)")
    root = fresh_root()
    run_dir = root / "runs/demo/text"
    # Never online, whatever the environment asks.
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    for _ in range(2):  # the second start of the finished run rewrites the views from metrics.jsonl
        r = vlmerge_cli(*train_cmd(root, *SHORT, "train.monitor=[tensorboard, wandb]"), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        (offline,) = wandb_offline_runs(run_wandb_dir(run_dir))
        rows = rows_of(run_dir)
        history = wandb_history(offline)
        assert [h["_step"] for h in history] == [row["step"] for row in rows]
        assert all({k: h[k] for k in CURVES} == {k: row[k] for k in CURVES} for h, row in zip(history, rows))
        assert on_disk(run_dir) == expected(rows)
