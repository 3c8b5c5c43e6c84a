"""`vlmerge sweep plan --estimate`: the plan it prices (trained or projected), the arithmetic, the report.
(Its accuracy against a measured sweep is a benchmark: tests/bench/bench_estimate.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from conftest import REPO, vlmerge_cli
from test_sweep import SWEEP
from vlmerge.config import load_config
from vlmerge.errors import VlmergeError
from vlmerge.launch import slurm_seconds
from vlmerge.layout import checkpoint_words
from vlmerge.sweep.estimate import (Calibration, Estimate, TaskCost, best_text_stand_in, checkpoints_of, item_seconds,
                                    projected_checkpoints, report)
from vlmerge.sweep.plan import WorkItem, plan
from vlmerge.train.schedule import babylm_words

PAPER = REPO / "configs" / "babylm-takmaz2025.yaml"


def test_before_training_the_papers_plan_is_projected_from_the_schedule(tmp_path):
    cfg = load_config(PAPER, [f"paths.root={tmp_path}"])
    runs, said = checkpoints_of(cfg, {"text": 50_000_000, "multimodal": 100_000_000})
    assert "projected from the schedule" in said
    # 10 epochs of 100M words: the 28 BabyLM checkpoints to 1B (every epoch's end among them), and step 0
    assert [checkpoint_words(c) for c in runs["multimodal"]] == [0, *babylm_words()]
    text = [checkpoint_words(c) for c in runs["text"]]  # 10 epochs of 50M: to 500M, with 150M, 250M … as epoch ends
    assert text[-1] == 500_000_000 and 150_000_000 in text and 600_000_000 not in text
    items = plan(cfg, best_text_stand_in(cfg, runs), runs)
    assert len(items) == 28 and sum(len(it.alphas) for it in items) == 308  # issue 23's 308 merged models
    assert {it.text for it in items} == {str(runs["text"][-1].relative_to(cfg.root))}
    with pytest.raises(VlmergeError, match="run text has no checkpoints and no corpus to project them from; "
                                           "give --words-per-epoch text=N"):
        checkpoints_of(cfg, {})


def test_projected_checkpoints_are_the_schedule_and_the_epoch_ends(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}", "checkpoints.words=[1000, 2000, 5000, 9000]", "train.epochs=2"])
    assert [checkpoint_words(c) for c in projected_checkpoints(cfg, "text", 3000)] == [0, 1000, 2000, 3000, 5000, 6000]


def calibration(**kw) -> Calibration:
    values = dict(device="cpu (test)", model="m", import_s=5.0, setup_s=1.0, load_s=2.0,
                  merge_s={"linear": 0.5}, first_merge_s={"linear": 1.5}, distances_s=3.0, probe_s=0.0,
                  tasks=[TaskCost("blimp", 1000, 100, prepare_s=0.2, score_s=1.0, bytes=10)], peak_rss=2**30,
                  peak_gpu=0, metric_rows=10, item_rows=1000.0, metric_row_bytes=50.0, item_row_bytes=10.0,
                  export_bytes=0.0)
    return Calibration(**values | kw)


def test_an_items_seconds_are_its_load_tokenising_and_each_alpha_merged_and_scored():
    item = WorkItem("t", "m", "linear", "{}", (0.0, 0.5, 1.0), None, "s")
    # load 2 + tokenising 0.2 × 10 + first merge 1.5 + 2 more merges × 0.5 + 3 α × scoring 1.0 × 10
    assert item_seconds(item, calibration()) == pytest.approx(2 + 2 + 1.5 + 1 + 30)
    # with the probe (0.1 s a model) and the adaptive search scoring 0.4 of 11 α: 5 α merged again and scored
    eleven = dataclasses.replace(item, alphas=tuple(i / 10 for i in range(11)))
    assert item_seconds(eleven, calibration(probe_s=0.1), 0.4) == pytest.approx(2 + 2 + 1.5 + (10 + 5) * 0.5
                                                                                 + 11 * 0.1 + 5 * 10)


def test_the_report_warns_past_the_partitions_time_limit_and_max_array_size():
    est = Estimate(items=3000, merged_models=33000, endpoints=10, pairs=100, task_seconds=[7200.0, 3600.0],
                   one_process_seconds=10800.0, best_text_seconds=0.0, peak_rss=2**31, peak_gpu=0,
                   results_bytes=2**20, export_bytes=0.0)
    lines = report(calibration(), est, plan_source="trained", array=(1000, 3), max_array_size=1001,
                   time_limit=("gpu", 3600.0))
    text = "\n".join(lines)
    assert "1000 task(s) × 3 item(s); per task 2.00 h at most" in text
    assert "warning: 3000 items exceed MaxArraySize 1001: 3 items per array task" in text
    assert "warning: an array task needs about 2.00 h, more than partition gpu's time limit of 60.0 min" in text
    assert "--time=0-02:36:00" in text  # the longest task + 30%
    quiet = report(calibration(), est, plan_source="trained", array=(2, 1), max_array_size=1001,
                   time_limit=("gpu", None))
    assert not any("warning" in line for line in quiet)


@pytest.mark.parametrize("text, seconds", [("UNLIMITED", None), ("30", 1800), ("30:15", 1815), ("04:00:00", 14400),
                                           ("2-12", 216000), ("1-02:30", 95400), ("1-00:00:00", 86400)])
def test_slurm_durations(text, seconds):
    assert slurm_seconds(text) == seconds


@pytest.mark.slow
def test_the_estimate_of_a_trained_sweep_prices_every_item_and_writes_nothing(twins, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    before = sorted(p for p in root.rglob("*"))
    r = vlmerge_cli("sweep", "plan", "--estimate", "--json", "--sample", "50", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    est, cal = out["estimate"], out["calibration"]
    # 3 same-words pairs × (linear + task arithmetic at two λ), 3 α; each twin's checkpoints once
    assert (est["items"], est["merged_models"], est["endpoints"], est["pairs"]) == (9, 27, 6, 6)
    assert len(est["task_seconds"]) == 9 and out["array"] == [9, 1]
    assert sum(est["task_seconds"]) > est["one_process_seconds"] > 0  # nine starts against one
    assert {t["task"]: t["sampled"] for t in cal["tasks"]} == {"blimp": 50, "winoground": 10}
    assert est["peak_rss"] > 0 and est["results_bytes"] > 0
    assert sorted(p for p in root.rglob("*")) == before  # an estimate writes nothing
    text = vlmerge_cli("sweep", "plan", "--estimate", "--sample", "50", f"paths.root={root}", *SWEEP)
    assert "plan: 9 item(s) to run (the trained runs' checkpoints): 27 merged models" in text.stdout, text.stderr


def test_the_best_text_data_is_read_before_any_calibrating(tmp_path, monkeypatch):
    from vlmerge.sweep import estimate as est

    monkeypatch.setattr(est, "calibration_model", lambda *a, **k: pytest.fail("calibrated before reading the data"))
    cfg = load_config(PAPER, [f"paths.root={tmp_path}", f"sweep.best_text_data={tmp_path}/no-blimp"])
    words = {"text": 50_000_000, "multimodal": 100_000_000}
    with pytest.raises(VlmergeError, match=f"{tmp_path}/no-blimp: no such file or folder"):
        est.estimate_command(cfg, words_per_epoch=words, counts={}, calibrate_with=None, sample=None,
                             max_array_size=1000, time_limit=None, as_json=True)
    # the picking data's items, whatever the sweep's own data of that task
    picking = tmp_path / "blimp"
    picking.mkdir()
    (picking / "p.jsonl").write_text('{"sentence_good": "a b", "sentence_bad": "b a"}\n' * 3)
    assert est.best_text_items(load_config(PAPER, [f"paths.root={tmp_path}", f"sweep.best_text_data={picking}"])) == 3
