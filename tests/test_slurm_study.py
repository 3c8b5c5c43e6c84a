"""Sung et al.'s study on the real local Slurm: jobs/study.sh runs its DAG of two arrays to the report."""

import subprocess

from conftest import REPO, SMALL_WORLD
from slurm_cluster import slurm_env
from test_slurm_sweep import wait_for_no_jobs
from vlmerge.config import load_config
from vlmerge.layout import result_file, study_finetune_name, study_result_name
from vlmerge.study import expert_config, expert_settings, maa_config

# The smallest study with every kind of task: MAA and one seed run in the training array; three
# settings (MB without a seed, `all` and `ffn` after one seed epoch) in the settings array.
STUDY = [*SMALL_WORLD, "study.total_epochs=2", "study.seed_epochs=[0, 1]", "study.variants=[ffn]",
         "study.variant_seed_epochs=1", "study.alphas=[0.5]", "study.lams=[1.0]", "study.gammas=[0.9]",
         "train.micro_batch_size=32", "train.log_every=20", "study.finetune=[ft_vqa]", "finetune.epochs=1",
         "finetune.batch_size=4", "finetune.vqa_min_answer_count=1"]


def test_study_sh_runs_both_arrays_to_the_report(slurm_cluster, tmp_path):
    root = tmp_path / "root"
    args = [f"paths.root={root}", *STUDY]
    r = subprocess.run(["bash", "jobs/study.sh", "configs/demo-sung.yaml", *args], cwd=REPO,
                       env=slurm_env({"VLMERGE_SBATCH_ARGS": "--cpus-per-task=1"}), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "training array" in r.stdout and "(2 tasks)" in r.stdout and "(3 tasks)" in r.stdout
    wait_for_no_jobs("vlmerge-", 1200)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "logs/sung").glob("*.out")))
    cfg = load_config("configs/demo-sung.yaml", args)
    names = {study_result_name(maa_config(cfg).experiment, "maa")}
    for variant, k in expert_settings(cfg):
        experiment = expert_config(cfg, variant, k).experiment
        names |= {study_result_name(experiment, n) for n in ("msa", "interpolation-alpha0.5")}
    names |= {study_finetune_name(n, "ft_vqa") for n in names}  # each model fine-tuned too (Sung et al.'s protocol)
    missing = [n for n in sorted(names) if not result_file(root / "results/sung", "metrics", n).is_file()]
    assert not missing, (missing, logs)
    assert (root / "reports/sung/sung.html").is_file(), logs  # the DAG's last job
