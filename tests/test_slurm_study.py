"""Sung et al.'s study on the real local Slurm: jobs/study.sh runs its DAG of arrays to the report."""

import re
import subprocess

from conftest import REPO, SMALL_WORLD
from slurm_cluster import slurm_env, wait_for_session_jobs
from vlmerge.config import load_config
from vlmerge.modelkey import study_key
from vlmerge.results import read_results
from vlmerge.study import expert_settings

# The smallest study with every kind of task: MAA and one seed run in the training array; three
# settings (MB without a seed, `all` and `ffn` after one seed epoch) in the settings array; their
# work items (MAA, and each setting) in the items array, fine-tuned on ft_vqa in the last array.
STUDY = [*SMALL_WORLD, "study.total_epochs=2", "study.seed_epochs=[0, 1]", "study.variants=[ffn]",
         "study.variant_seed_epochs=1", "study.alphas=[0.5]", "study.lams=[1.0]", "study.gammas=[0.9]",
         "train.micro_batch_size=32", "train.log_every=20", "study.finetune=[ft_vqa]", "finetune.epochs=1",
         "finetune.batch_size=4", "finetune.vqa_min_answer_count=1"]


def test_study_sh_runs_its_arrays_to_the_report(slurm_cluster, tmp_path):
    root = tmp_path / "root"
    args = [f"paths.root={root}", *STUDY]
    r = subprocess.run(["bash", "jobs/study.sh", "configs/demo-sung.yaml", *args], cwd=REPO,
                       env=slurm_env({"VLMERGE_SBATCH_ARGS": "--cpus-per-task=1"}), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for array, tasks in (("training", 2), ("settings", 3), ("items", 4), ("fine-tuning", 4)):
        assert re.search(rf"{array} array \d+ \({tasks} tasks\)", r.stdout), r.stdout
    wait_for_session_jobs(1200)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "logs/sung").glob("*.out")))
    cfg = load_config("configs/demo-sung.yaml", args)
    # every studied model, by its study key: MAA; MSA and interpolation α=0.5 of each setting; the
    # other methods at the longest seed
    expected = {(study_key("maa"), "none")}
    for variant, k in expert_settings(cfg):
        expected |= {(study_key(variant, k), "none"), (study_key(variant, k), "experts_interpolation")}
    expected |= {(study_key("all", 1), "experts_arithmetic"), (study_key("all", 1), "experts_regmean")}
    frame = read_results(root / "results/sung")
    for task in ("blimp", "ft_vqa"):  # each model scored, then fine-tuned (Sung et al.'s protocol)
        got = set(frame[frame.task == task][["study", "method"]].itertuples(index=False, name=None))
        assert got == expected, (task, got ^ expected, logs)
    assert (root / "reports/sung/sung.html").is_file(), logs  # the DAG's last job
