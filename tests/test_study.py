"""`vlmerge study` through the sweep's work items: every studied model scored and fine-tuned once, its
identity in the study column, a killed study resumed without redoing finished items."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL_WORLD
from vlmerge.config import load_config
from vlmerge.errors import VlmergeError
from vlmerge.results import read_results

# MAA and one expert setting (no seed: the longest seed, so every method of the grid), one α, λ and γ:
# five models, each scored and fine-tuned on the demo's NLVR² set.
STUDY = [*SMALL_WORLD, "study.total_epochs=2", "study.seed_epochs=[0]", "study.variants=[]",
         "study.variant_seed_epochs=0", "study.alphas=[0.5]", "study.lams=[1.0]", "study.gammas=[0.9]",
         "train.micro_batch_size=32", "study.finetune=[ft_nlvr2]", "finetune.epochs=1", "finetune.batch_size=4"]
ALL_K0 = json.dumps({"k_seed": 0, "variant": "all"})
MODELS = {  # (study key, method, α) of every studied model
    (json.dumps({"variant": "maa"}), "none", 0.0), (ALL_K0, "none", 0.0), (ALL_K0, "experts_interpolation", 0.5),
    (ALL_K0, "experts_arithmetic", None), (ALL_K0, "experts_regmean", 0.5)}


def study(root, *extra, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmerge", "study", "--quiet", "--config", "configs/demo-sung.yaml",
                             f"paths.root={root}", *STUDY, *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def models(frame, task: str) -> set:
    rows = frame[frame.task == task].drop_duplicates(["study", "method", "alpha"])
    return {(s, m, None if a != a else a) for s, m, a in zip(rows.study, rows.method, rows.alpha)}


def test_a_killed_study_resumes_skipping_finished_items_and_records_each_models_study_key(tmp_path):
    root = tmp_path / "root"
    metrics = root / "results/sung/metrics"
    # Killed once its first fine-tuning item is written: training, every scoring item and part of
    # the fine-tuning are done by then.
    first = study(root)
    deadline = time.time() + 600
    while not list(metrics.glob("ft-*.parquet")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    out = first.communicate()[0]
    before = {p.name: p.stat().st_mtime_ns for p in metrics.glob("*.parquet")}
    assert len([n for n in before if not n.startswith("ft-")]) == 4 + 1 and len(before) < 10, (sorted(before), out)

    second = study(root)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    scored = [line for line in out.splitlines() if line.startswith("sweep item")]
    assert len(scored) == 4 and all(line.endswith("done already") for line in scored), out  # none ran again
    after = {p.name: p.stat().st_mtime_ns for p in metrics.glob("*.parquet")}
    assert {n: after[n] for n in before} == before  # nothing finished was rewritten
    frame = read_results(root / "results/sung")
    assert models(frame, "blimp") == MODELS and models(frame, "ft_nlvr2") == MODELS
    assert (root / "reports/sung/sung.html").is_file()

    third = study(root)  # all done: nothing runs, nothing is written
    assert third.communicate(timeout=600)[0].count("sweep finetune:") == 0 and third.returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in metrics.glob("*.parquet")} == after


def test_a_studys_links_stay_inside_a_root_copied_elsewhere(tmp_path):
    from vlmerge.study import expert_config, share_inputs

    cfg = load_config(None, [f"paths.root={tmp_path / 'root'}", *STUDY])
    for folder in (cfg.layout.tokenizer_dir, cfg.layout.corpus_dir):
        folder.mkdir(parents=True)
        (folder / "made.txt").write_text(folder.name)
    share_inputs(cfg, expert_config(cfg, "all", 0))
    subprocess.run(["cp", "-a", str(tmp_path / "root"), str(tmp_path / "copy")], check=True)
    shutil.rmtree(tmp_path / "root")
    sub = expert_config(load_config(None, [f"paths.root={tmp_path / 'copy'}", *STUDY]), "all", 0)
    assert (sub.layout.tokenizer_dir / "made.txt").read_text() == "tokenizer"
    assert (sub.layout.corpus_dir / "made.txt").read_text() == "corpus"


def test_the_study_checks_its_fine_tuning_tasks_before_training(tmp_path):
    from vlmerge.study import check_finetune_tasks, prepare_study

    cfg = load_config("configs/demo-sung.yaml", [f"paths.root={tmp_path}", *STUDY])
    with pytest.raises(VlmergeError, match="study.finetune: 'ft_vqa' has no folder in finetune.tasks"):
        prepare_study(cfg.model_copy(update={"study": cfg.study.model_copy(update={"finetune": ["ft_vqa"]}),
                                             "finetune": cfg.finetune.model_copy(update={"tasks": {}})}))
    assert not (tmp_path / "demo").exists()  # before the data stages
    prepare_study(cfg)
    big = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"batch_size": 100_000})})
    with pytest.raises(VlmergeError, match="ft_nlvr2 has .* training examples, fewer than one batch of 100000"):
        check_finetune_tasks(big)
    assert not (tmp_path / "runs/sung-maa/multimodal").exists()  # nothing trained
