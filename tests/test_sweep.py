"""`vlmerge eval` and the sweep on the small world's twins: rows, idempotence, kills, array layout, status."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST_TRAIN, REPO, SMALL_WORLD, stale_temp, vlmerge_cli
from vlmerge.config import load_config
from vlmerge.results import DEDUPE, RESULTS_SCHEMA, read_results
from vlmerge.sweep.plan import array_layout, plan
from vlmerge.layout import checkpoint_words, list_checkpoints

SWEEP = [*SMALL_WORLD, *FAST_TRAIN, "sweep.alphas=[0.0, 0.5, 1.0]", "sweep.tasks=[blimp, winoground]",
         "sweep.methods=[{name: linear}, {name: task_arithmetic, grid: {lam: [1.0, 1.5]}}]"]


def test_eval_writes_the_results_schema_and_prints_a_table(twins, tmp_path):
    ckpt = list_checkpoints(twins / "runs/demo/text")[-1]
    r = vlmerge_cli("eval", "--model", str(ckpt), "--task", "blimp", "--task", "winoground", "--task", "perplexity",
                    f"paths.root={twins}", *SMALL_WORLD, "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    rows = pd.read_parquet(tmp_path / "ev/results.parquet")
    assert list(rows.columns) == RESULTS_SCHEMA.names
    assert set(rows.task) == {"blimp", "winoground", "perplexity"}
    assert (rows.method == "none").all() and (rows.alpha == 1.0).all() and (rows.text_run == "text").all()
    assert rows.text_words.iloc[0] == json.loads((ckpt / "trainer_state.json").read_text())["words_seen"]
    mean = rows[(rows.task == "blimp") & (rows.subtask == "") & (rows.metric == "accuracy")]
    assert len(mean) == 1 and 0 <= mean.value.iloc[0] <= 1
    assert f"{mean.value.iloc[0]:.4f}" in r.stdout and "winoground" in r.stdout
    assert len(pd.read_parquet(tmp_path / "ev/items.parquet")) > 0


def test_eval_skips_and_counts_items_without_image_features(twins, tmp_path):
    world = twins / "demo"
    lines = (world / "eval/winoground.jsonl").read_text().splitlines()
    extra = {**json.loads(lines[0]), "id": 9999, "image_0": "no-such-image", "image_1": "nor-this"}
    (tmp_path / "wg.jsonl").write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    r = vlmerge_cli("eval", "--model", str(list_checkpoints(twins / "runs/demo/multimodal")[-1]),
                    "--task", f"winoground={tmp_path / 'wg.jsonl'}", f"paths.root={twins}", *SMALL_WORLD,
                    "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    assert "1 problem(s) (1 no feature)" in r.stderr
    rows = pd.read_parquet(tmp_path / "ev/results.parquet")
    assert rows[(rows.metric == "group_score") & (rows.subtask == "")].n.iloc[0] == len(lines)


def test_shuffled_features_change_what_the_model_reads_from_the_images_and_nothing_else(twins):
    # `vlmerge eval --shuffle-features`: the control under which a model's image-dependent scores must fall
    # to chance. Every image is scored with another image's feature; text tasks (the null image) are untouched.
    from vlmerge.data import FeatureTable
    from vlmerge.evaluate.run import load_model, prepare, task_specs
    from vlmerge.evaluate.scoring import Scorer
    from vlmerge.problems import ProblemLog

    cfg = load_config(None, [f"paths.root={twins}", *SMALL_WORLD])
    model, tokenizer = load_model(list_checkpoints(cfg.layout.run_dir("multimodal"))[-1])
    specs = task_specs(cfg, ["winoground", "blimp"])

    def scores(table: FeatureTable) -> dict[str, np.ndarray]:
        scorer = Scorer(model, tokenizer, features=table, prompt=cfg.eval.prompt, dtype="fp32", batch_size=64)
        return {t.task.name: scorer.score(scorer.prepared(t.requests)).logprob
                for t in prepare(specs, table, ProblemLog())}

    shuffled_table = FeatureTable(cfg.eval_store_path)
    shuffled_table.shuffle(0)
    real, shuffled = scores(FeatureTable(cfg.eval_store_path)), scores(shuffled_table)
    assert np.array_equal(real["blimp"], shuffled["blimp"])
    assert (real["winoground"] != shuffled["winoground"]).mean() > 0.9


def test_sweep_exports_chosen_merges_as_an_eval_of_the_merge_from_disk_would(twins, tmp_path):
    # sweep.export_babylm: BabyLM's prediction files of the chosen merges, written while the sweep has them
    # in memory; a user who merges the pair to disk and runs `eval --export` must get the same files.
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    chosen = ["sweep.alphas=[0.0, 0.5]", "sweep.tasks=[blimp]", "sweep.methods=[{name: linear}]",
              "sweep.export_babylm=[{method: linear, alpha: 0.5}]"]
    r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, *chosen)
    assert r.returncode == 0, r.stderr
    cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, *chosen])
    exports = sorted((root / "results/demo/babylm").iterdir())
    pairs = plan(cfg)
    assert [e.name for e in exports] == [f"linear-alpha0.50-{Path(p.mm).name.replace('-', '')}" for p in pairs]
    pair = pairs[-1]
    r = vlmerge_cli("merge", "--text", str(root / pair.text), "--mm", str(root / pair.mm), "--alpha", "0.5",
                    "--out", str(tmp_path / "merge"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = vlmerge_cli("eval", "--quiet", "--model", str(tmp_path / "merge"), "--task", "blimp", f"paths.root={root}",
                    *SMALL_WORLD, "--out", str(tmp_path / "ev"), "--export", "babylm", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr

    def files(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.json")}

    swept = files(exports[-1] / "main")
    assert list(swept) == ["zero_shot/causal/blimp/blimp/predictions.json"] and swept == files(tmp_path / "export")


def test_unknown_task_lists_the_known_ones(twins, tmp_path):
    r = vlmerge_cli("eval", "--model", str(twins), "--task", "glue=/x", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "unknown task 'glue' (known: aoa, blimp, blimp_supplement, comps, devbench_things, devbench_trog" in r.stderr


def test_a_merge_with_nan_scores_is_an_error_naming_the_merge_and_the_task(twins, tmp_path, monkeypatch, capsys):
    # A NaN compares false with everything: every item's first candidate, the correct one, would be chosen
    from vlmerge.cli import main
    from vlmerge.merge.core import PairMerger

    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    merge_into = PairMerger.merge_into

    def nan_at_half(self, model, method, alpha, *args, **kwargs):  # a merge whose weights come out NaN
        merge_into(self, model, method, alpha, *args, **kwargs)
        if alpha == 0.5:
            with torch.no_grad():
                next(p for name, p in model.named_parameters() if name.endswith("norm.weight")).fill_(float("nan"))

    monkeypatch.setattr(PairMerger, "merge_into", nan_at_half)
    sweep = [f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, "sweep.alphas=[0.0, 0.5]", "sweep.tasks=[blimp]",
             "sweep.methods=[{name: linear}]", "compute.device=cpu"]
    assert main(["sweep", "run", "--quiet", *sweep]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    first = plan(load_config(None, sweep))[0]
    assert f"error: the linear merge at α 0.5 of {first.text} and {first.mm}: task blimp: " in err, err
    assert "scores are NaN or infinite" in err
    assert not (root / "results/demo/metrics" / f"{first.item_id}.parquet").exists()


@pytest.fixture(scope="module")
def swept(twins, tmp_path_factory):
    """The twins' root with the sweep run once (copied so that the twins stay clean)."""
    root = tmp_path_factory.mktemp("swept")
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0, r.stderr
    return root


def test_results_hold_one_row_per_planned_key(swept):
    cfg = load_config(None, [f"paths.root={swept}", *SWEEP])
    items = plan(cfg)
    assert len(items) == 3 * 3  # 3 same-words pairs × (linear + task arithmetic at two λ)
    frame = read_results(swept / "results/demo")
    merged = frame[frame.method != "none"]
    assert not frame.duplicated(["item_id", *DEDUPE["metrics"]]).any()
    per_model = merged.groupby(["item_id", "alpha"]).size()
    assert len(per_model) == len(items) * 3 and per_model.nunique() == 1
    assert set(merged.item_id) == {it.item_id for it in items}
    # the unmerged twins: once per checkpoint, not once per item
    endpoints = frame[frame.method == "none"]
    assert endpoints.groupby(["item_id"]).ngroups == 3 + 3


@pytest.mark.slow
def test_sweep_workers_share_the_items_and_write_what_one_process_does(twins, swept, tmp_path):
    # compute.workers (default: one per visible GPU): each worker process runs its share of the items
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SWEEP, "compute.workers=2", "compute.device=cpu")
    assert r.returncode == 0, r.stderr
    assert "sweep: 2 workers" in r.stderr
    assert r.stdout.count("sweep item 1/") == 2  # each worker numbers its own share
    key = ["item_id", *DEDUPE["metrics"]]
    ours = read_results(root / "results/demo").set_index(key).value.sort_index()
    one = read_results(swept / "results/demo").set_index(key).value.sort_index()
    assert ours.index.equals(one.index)
    np.testing.assert_allclose(ours.to_numpy(), one.to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_twins_and_linear_endpoints_equal_an_eval_of_the_checkpoint_from_disk(swept, tmp_path):
    # The sweep scores its twins (and linear at α = 0 and 1) with the pair already in memory; a
    # user's `vlmerge eval` loads the checkpoint from disk: both must give the same numbers.
    frame = read_results(swept / "results/demo")
    key = ["task", "subtask", "metric"]
    pair = plan(load_config(None, [f"paths.root={swept}", *SWEEP]))[-1]
    for rel, alpha, words in ((pair.mm, 0.0, "mm_words"), (pair.text, 1.0, "text_words")):
        ckpt, run = swept / rel, Path(rel).parts[2]
        r = vlmerge_cli("eval", "--model", str(ckpt), "--task", "blimp", "--task", "winoground",
                        f"paths.root={swept}", *SWEEP, "--out", str(tmp_path / run))
        assert r.returncode == 0, r.stderr
        from_disk = pd.read_parquet(tmp_path / run / "results.parquet").set_index(key).value.sort_index()
        n_words = json.loads((ckpt / "trainer_state.json").read_text())["words_seen"]
        at = frame[(frame[words] == n_words) & (frame.alpha == alpha)]
        for method in ("none", "linear"):
            swept_rows = at[(at.method == method) & (at.task != "probe")].set_index(key).value.sort_index()
            assert len(swept_rows) == len(from_disk) > 0
            pd.testing.assert_series_equal(swept_rows, from_disk, check_exact=True, check_names=False)
        # the demo sweep probes every model: the twin and the linear endpoint are one model, one probe
        twin, linear = (at[(at.method == m) & (at.task == "probe")].set_index(key).value.sort_index()
                        for m in ("none", "linear"))
        assert len(twin) == 4
        pd.testing.assert_series_equal(twin, linear, check_exact=True, check_names=False)


def test_analyze_reports_on_the_sweep_without_importing_torch(swept, tmp_path):
    code = ("import sys; from vlmerge.cli import main; "
            f"rc = main(['analyze', '--quiet', 'paths.root={swept}', *{SWEEP!r}, '--out', {str(tmp_path)!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    corr = pd.read_csv(tmp_path / "correlations.csv")
    assert set(corr.method) == {"linear", "task_arithmetic"}
    assert set(corr.task) == {"blimp", "winoground", "winoground/tag:attribute", "winoground/tag:binding"}
    assert (corr.n == 3).all() and corr.pearson.notna().any()  # three checkpoint pairs
    assert len(list((tmp_path / "figures").glob("training_curves.png"))) == 1


@pytest.mark.slow
def test_killed_item_leaves_no_file_and_a_rerun_completes_only_the_missing(swept, tmp_path):
    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{swept}/.", str(root)], check=True)
    metrics = root / "results/demo/metrics"
    cfg = load_config(None, [f"paths.root={root}", *SWEEP])
    items = plan(cfg)
    for it in items[4:]:  # forget five items' results
        (metrics / f"{it.item_id}.parquet").unlink()
        (root / "results/demo/items" / f"{it.item_id}.parquet").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "vlmerge", "sweep", "run", "--quiet", f"paths.root={root}", *SWEEP],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics / f"{items[4].item_id}.parquet").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during item 6 (item 5 just finished)
    proc.wait()
    done = {p.stem for p in metrics.glob("*.parquet")}
    assert not any(p.name.endswith(".parquet") for p in metrics.iterdir() if p.stem not in done)
    before = sum(it.item_id in done for it in items)
    r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0, r.stderr
    assert f"{len(items) - before} item(s) run, {before} already done" in r.stdout
    assert not read_results(metrics.parent).duplicated(["item_id", *DEDUPE["metrics"]]).any()
    r = vlmerge_cli("results", "compact", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0 and len(list(metrics.glob("*.parquet"))) == 1
    again = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SWEEP)
    assert f"0 item(s) run, {len(items)} already done" in again.stdout


def test_status_counts_a_half_finished_sweep_from_its_results_and_logs_without_slurm(swept, tmp_path, monkeypatch,
                                                                                     capsys):
    from vlmerge.cli import main

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{swept}/.", str(root)], check=True)
    sweep = [f"paths.root={root}", *SWEEP]
    metrics = root / "results/demo/metrics"
    items = plan(load_config(None, sweep))  # 3 pairs × 3 settings, 3 α each; one item per array task
    for it in items[4:]:  # forget five items' results
        (metrics / f"{it.item_id}.parquet").unlink()
        (root / "results/demo/items" / f"{it.item_id}.parquet").unlink()
    # the rest of the sweep in one process, killed part way: item 4 done, item 5 killed mid-way
    proc = subprocess.Popen([sys.executable, "-m", "vlmerge", "sweep", "run", "--quiet", *sweep])
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics / f"{items[4].item_id}.parquet").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (metrics / f"{items[5].item_id}.parquet").exists()
    # array task 6 fails on a corrupt checkpoint, its output where Slurm writes an array task's log
    (root / items[6].mm / "model.safetensors").write_bytes(b"not safetensors")
    log = root / "logs/demo/vlmerge-sweep-4242_6.out"
    log.parent.mkdir(parents=True)
    with log.open("w") as out:
        failed = subprocess.run([sys.executable, "-m", "vlmerge", "sweep", "run", "--quiet", "--index", "6",
                                 "--per-task", "1", *sweep], stdout=out, stderr=subprocess.STDOUT)
    assert failed.returncode != 0
    last_line = log.read_text().strip().splitlines()[-1]

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no Slurm to ask: the results and logs alone
    for compacted in (False, True):  # the results as the sweep writes them, then compacted
        assert main(["status", *sweep]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("sweep demo: 9 item(s) planned, 5 done, 1 failed, 3 not done (no Slurm"), lines
        assert lines[1] == (f"  failed: {items[6].item_id} ({items[6].method}, {Path(items[6].mm).name}), array task 6, "
                            f"logs/demo/vlmerge-sweep-4242_6.out: {last_line}"), lines
        assert lines[2].startswith("  ETA: ") and lines[2].endswith("models/h"), lines
        assert "for the 12 model(s) left" in lines[2]  # items 5 to 8, 3 α each
        assert len(lines) == 3
        if not compacted:
            assert main(["results", "compact", *sweep]) == 0
            capsys.readouterr()
    # pairing best_text: the plan needs every checkpoint scored first, which status leaves to the sweep
    assert main(["status", *sweep, "sweep.pairing=best_text"]) == 2
    assert "the twins' checkpoints are not all scored yet" in capsys.readouterr().err
    assert not (root / "results/demo/best_text.json").exists()


@pytest.mark.parametrize("log, line", [
    ("sweep item 1/1 x (linear, words-1): load 0.1s\nvlmerge sweep: error: a.yaml: no such key\n"
     "srun: error: node1: task 0: Exited with exit code 2\n", "vlmerge sweep: error: a.yaml: no such key"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n",
     "torch.OutOfMemoryError: CUDA out of memory"),
    ("sweep: job 12, array task 3, on node1\nsrun: error: node1: task 0: Killed\n", "srun: error: node1: task 0: Killed"),
    ("sweep: job 12, array task 3, on node1\nslurmstepd: error: *** JOB 12 ON node1 CANCELLED AT 2025-01-01T00:00:00 "
     "DUE TO TIME LIMIT ***\nsrun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n",
     "slurmstepd: error: *** JOB 12 ON node1 CANCELLED AT 2025-01-01T00:00:00 DUE TO TIME LIMIT ***"),
    ("sweep: job 12, array task 3, on node1\nsweep item 1/1 x (linear, words-1): load 0.1s\n"
     "sweep: 1 item(s) run, 0 already done\n", None),
])
def test_a_failed_jobs_log_line_is_its_own_last_error_before_sruns_echo(tmp_path, log, line):
    from vlmerge.sweep.status import failure_line

    (tmp_path / "x.out").write_text(log)
    assert failure_line(tmp_path / "x.out") == line


def test_eta_is_the_models_left_at_the_finished_items_rate():
    from vlmerge.sweep.status import eta

    # 3 models each at t = 0, 60, 120 s: 6 models in the 120 s after the first finish, 3 per minute
    assert eta([(120.0, 3), (0.0, 3), (60.0, 3)], 6) == (120.0, 180.0)
    assert eta([(0.0, 3)], 6) is None and eta([(5.0, 3), (5.0, 3)], 6) is None


@pytest.mark.parametrize("n, max_size, expected", [(5, 1001, (5, 1)), (1001, 1001, (1001, 1)),
                                                    (1002, 1001, (501, 2)), (2500, 1001, (834, 3)), (0, 8, (0, 1))])
def test_array_layout_packs_items_past_max_array_size(n, max_size, expected):
    tasks, per_task = array_layout(n, max_size)
    assert (tasks, per_task) == expected and tasks <= max_size and tasks * per_task >= n


def test_a_rerun_removes_what_killed_items_left_and_compact_keeps_foreign_files(swept, tmp_path):
    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{swept}/.", str(root)], check=True)
    results = root / "results/demo"
    left = [stale_temp(results / d / "x.parquet") for d in ("metrics", "items", "distances")]
    foreign = results / "metrics" / "my-notes.parquet"
    foreign.write_bytes(b"PAR1 a user's file")
    r = vlmerge_cli("sweep", "run", "--quiet", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in left)
    r = vlmerge_cli("results", "compact", f"paths.root={root}", *SWEEP)
    assert r.returncode == 0, r.stderr
    assert "left alone (not this sweep's): my-notes.parquet" in r.stdout
    assert foreign.read_bytes() == b"PAR1 a user's file"
    assert len(list((results / "metrics").glob("compact-*.parquet"))) == 1


def test_salts_of_items_do_not_depend_on_where_the_root_is(tmp_path):
    # A root moved or copied keeps its items' ids: paths inside it count relative to it.
    from vlmerge.sweep.finetune import finetune_salt
    from vlmerge.sweep.plan import sweep_salt, sweep_tasks

    a, b = (load_config(None, [f"paths.root={tmp_path / name}", f"eval.features={tmp_path / name}/features/x.h5"])
            for name in ("a", "b"))
    assert finetune_salt(a, "cola") == finetune_salt(b, "cola")
    assert sweep_salt(a, sweep_tasks(a)) == sweep_salt(b, sweep_tasks(b))


def test_expert_methods_take_alpha_from_the_grid_and_need_only_the_expert_run():
    from vlmerge.errors import VlmergeError
    from vlmerge.sweep.plan import method_grid, sweep_runs

    cfg = load_config(None, ["sweep.methods=[{name: experts_regmean, grid: {gamma: [0.5, 1]}}, "
                             "{name: experts_arithmetic}]"])
    assert method_grid(cfg) == [("experts_regmean", {"gamma": 0.5}), ("experts_regmean", {"gamma": 1}),
                                ("experts_arithmetic", {})]  # (the parameters as given, as every method's)
    assert sweep_runs(cfg) == ["experts"]
    both = load_config(None, ["sweep.methods=[{name: linear}, {name: experts_interpolation}]"])
    assert sweep_runs(both) == ["text", "multimodal", "experts"]
    assert sweep_runs(load_config(None, [])) == ["text", "multimodal"]
    for bad, says in (("{name: experts_interpolation, params: {alpha: 0.3}}", "α comes from sweep.alphas"),
                      ("{name: experts_regmean, grid: {lam: [1]}}", "unknown parameter 'lam'"),
                      ("{name: experts_ties}", "unknown merge method 'experts_ties'")):
        with pytest.raises(VlmergeError, match=says):
            method_grid(load_config(None, [f"sweep.methods=[{bad}]"]))


def test_best_text_pairs_every_multimodal_checkpoint_with_the_text_checkpoint_best_on_its_own_data(twins, tmp_path,
                                                                                                   real_blimp):
    # Takmaz et al. pick the text checkpoint on the full BLiMP while the sweep scores the fast sets:
    # sweep.best_text_data is the data that picks it.
    from vlmerge.sweep.run import best_text_pairing

    root = tmp_path / "root"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    picking = tmp_path / "blimp-picking"
    picking.mkdir()
    for uid in ("anaphor_number_agreement", "determiner_noun_agreement_2", "npi_present_1"):
        (picking / f"{uid}.jsonl").write_text("".join((real_blimp / f"{uid}.jsonl").read_text().splitlines(True)[:40]))
    cfg = load_config(None, [f"paths.root={root}", *SWEEP, "sweep.pairing=best_text", f"sweep.best_text_data={picking}"])
    pairing = best_text_pairing(cfg)
    kept = json.loads((root / "results/demo/best_text.json").read_text())
    # both twins' checkpoints after step 0 are scored (the paper's Fig. 3); the text twin's pick
    for run in ("text", "multimodal"):
        ckpts = list_checkpoints(root / f"runs/demo/{run}")[1:]
        assert {c: v["words"] for c, v in kept["accuracy"][run].items()} == {
            str(c.relative_to(root)): checkpoint_words(c) for c in ckpts}
        assert all(0 <= v["accuracy"] <= 1 for v in kept["accuracy"][run].values())
    text = kept["accuracy"]["text"]
    best = max(text, key=lambda c: text[c]["accuracy"])
    assert set(pairing.values()) == {root / best} and len(pairing) == len(list_checkpoints(root / "runs/demo/multimodal")) - 1
    # kept scores are not scored again; a checkpoint missing from them is (a killed job resumes)
    mtime = (root / "results/demo/best_text.json").stat().st_mtime_ns
    assert best_text_pairing(cfg) == pairing and (root / "results/demo/best_text.json").stat().st_mtime_ns == mtime
    dropped = next(iter(kept["accuracy"]["multimodal"]))
    del kept["accuracy"]["multimodal"][dropped]
    (root / "results/demo/best_text.json").write_text(json.dumps(kept))
    best_text_pairing(cfg)
    again = json.loads((root / "results/demo/best_text.json").read_text())["accuracy"]["multimodal"]
    assert set(again) == {str(c.relative_to(root)) for c in list_checkpoints(root / "runs/demo/multimodal")[1:]}
    items = plan(cfg, pairing)
    assert {it.text for it in items} == {best} and len(items) == len(pairing) * 3
    # the picking data is part of what the kept scores are of: other data, scored again
    other = load_config(None, [f"paths.root={root}", *SWEEP, "sweep.pairing=best_text"])
    best_text_pairing(other)
    assert json.loads((root / "results/demo/best_text.json").read_text())["data"] == other.eval.tasks["blimp"]


# --- fine-tuning chosen merges after the sweep (sweep.finetune) ---------------------------------------------------

FINETUNE = ["finetune.tasks={cola: '{root}/demo/eval/glue'}", "finetune.epochs=1", "finetune.batch_size=8",
            "finetune.lr=1e-3", "sweep.finetune=[{method: linear, alpha: best}, {method: linear, alpha: 0.5}]"]


@pytest.mark.slow
def test_sweep_finetune_tunes_the_last_pairs_twins_and_chosen_merges_once_each(swept, tmp_path):
    from vlmerge.sweep.finetune import best_alphas, finetune_plan

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{swept}/.", str(root)], check=True)
    args = [f"paths.root={root}", *SWEEP, *FINETUNE]
    cfg = load_config(None, args)
    last = max(checkpoint_words(Path(it.mm)) for it in plan(cfg))
    best = {k: a for k, a in best_alphas(cfg).items() if k[0] == "linear" and k[3] == last}
    (alpha,) = best.values()
    items = finetune_plan(cfg, plan(cfg))
    # the last pair's two twins, its best linear merge and α = 0.5 (one item when they are the same α)
    merges = sorted({it.alpha for it in items if it.method == "linear"})
    assert merges == sorted({alpha, 0.5})
    assert len(items) == 2 + len(merges) and {it.task for it in items} == {"cola"}
    assert {it.method for it in items[:2]} == {"none"}  # the twins first
    r = vlmerge_cli("sweep", "finetune", "--array", *args)
    assert r.returncode == 0 and r.stdout.strip() == str(len(items))

    r = vlmerge_cli("sweep", "finetune", "--quiet", "--index", "0", *args)
    assert r.returncode == 0, r.stderr
    assert "sweep finetune: 1 item(s) run, 0 already done" in r.stdout
    r = vlmerge_cli("sweep", "finetune", "--quiet", *args)
    assert r.returncode == 0, r.stderr
    assert f"{len(items) - 1} item(s) run, 1 already done" in r.stdout
    frame = read_results(root / "results/demo")
    tuned = frame[frame.task == "glue/cola"]
    assert set(tuned.item_id) == {it.item_id for it in items}
    assert set(tuned.metric) == {"accuracy", "f1", "mcc"} and not tuned.duplicated(DEDUPE["metrics"]).any()
    # the twins' rows carry the sweep's own keys of the twins (method none, α 1 and 0) at the last pair
    twins = tuned[tuned.method == "none"]
    assert sorted(twins.alpha.unique()) == [0.0, 1.0]
    assert set(twins.text_words.dropna()) == {last} and set(twins.mm_words.dropna()) == {last}
    assert set(tuned[tuned.method == "linear"].alpha) == set(merges)
    # a merge at α = 0 is the multimodal model: the same fine-tuning, the same scores
    if 0.0 in merges:
        at0 = tuned[(tuned.method == "linear") & (tuned.alpha == 0.0)].set_index("metric").value
        mm = twins[twins.alpha == 0.0].set_index("metric").value
        pd.testing.assert_series_equal(at0.sort_index(), mm.sort_index(), check_names=False)
    again = vlmerge_cli("sweep", "finetune", "--quiet", *args)
    assert f"0 item(s) run, {len(items)} already done" in again.stdout
    # the report's table: per task the twins, then the merges, with accuracy's interval
    r = vlmerge_cli("analyze", "--quiet", *args, "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "report" / "finetune.csv")
    assert list(table.model[:2]) == ["multimodal twin", "text twin"] and len(table) == len(items)
    assert ((table.accuracy_low <= table.accuracy) & (table.accuracy <= table.accuracy_high)).all()
    assert "Fine-tuning" in (tmp_path / "report" / "report.html").read_text()
    # the compaction counts them as the sweep's own
    r = vlmerge_cli("results", "compact", *args)
    assert r.returncode == 0 and "left alone" not in r.stdout, r.stdout


def test_sweep_finetune_with_a_best_alpha_before_the_sweep_says_so(twins, tmp_path):
    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    r = vlmerge_cli("sweep", "finetune", "--quiet", f"paths.root={root}", *SWEEP, *FINETUNE)
    assert r.returncode == 2 and "run the sweep first" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_changed_gram_settings_make_new_regmean_items_and_new_grams_never_stale_ones(twins, tmp_path):
    from safetensors.torch import load_file

    from vlmerge.layout import statistics_file
    from vlmerge.merge.statistics import saved_settings, write_statistics

    root = tmp_path / "r"
    subprocess.run(["cp", "-a", f"{twins}/.", str(root)], check=True)
    methods = "sweep.methods=[{name: linear}, {name: regmean}]"

    def cfg(batches: int):
        return load_config(None, [f"paths.root={root}", *SWEEP, methods, f"sweep.statistics_batches={batches}"])

    one, two = plan(cfg(1)), plan(cfg(2))
    ids = {b: {m: {it.item_id for it in items if it.method == m} for m in ("linear", "regmean")}
           for b, items in ((1, one), (2, two))}
    assert ids[1]["linear"] == ids[2]["linear"] and not ids[1]["regmean"] & ids[2]["regmean"]
    ckpt = root / one[0].text
    out = statistics_file(ckpt, "grams")
    write_statistics(cfg(1), ckpt, ["grams"])
    first = load_file(out)
    assert saved_settings(out)["batches"] == 1
    mtime = out.stat().st_mtime_ns
    write_statistics(cfg(1), ckpt, ["grams"])
    assert out.stat().st_mtime_ns == mtime  # the same settings: kept
    write_statistics(cfg(2), ckpt, ["grams"])  # other settings: computed again, over the old file
    assert saved_settings(out)["batches"] == 2
    second = load_file(out)
    name = next(iter(first))
    assert not torch.equal(first[name], second[name])  # the sums of more batches
