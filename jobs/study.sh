#!/usr/bin/env bash
# Sung et al.'s study (`vlmerge study`) as a Slurm DAG (run it on a login node, from the repository root):
#
#   bash jobs/study.sh CONFIG [KEY=VALUE ...]
#
#   data (world, tokenizer, corpus, features) → training array: the agnostic baseline (MAA) and each
#   seed run → settings array: one expert setting (variant, K_seed) per task: its expert run, merges,
#   evaluations, distances → report (reports/<experiment>/sung/)
#
# Every job skips what is done: the same command resumes a broken DAG. Cluster options for every job
# go in VLMERGE_SBATCH_ARGS, as for jobs/pipeline.sh.
set -euo pipefail
config="${1:?usage: bash jobs/study.sh CONFIG [KEY=VALUE ...]}"
shift
overrides=("$@")
source jobs/submit.sh  # sbatch with the site's options, job, value, $logs

read -r trainings settings < <(python -m vlmerge study --array --config "$config" "${overrides[@]}")
array() {  # array PART TASKS DEPENDENCY: one of the study's arrays
    sbatch --parsable --job-name="vlmerge-study-$1" --array="0-$(($2 - 1))" --output="$logs/%x-%A_%a.out" \
        --dependency="afterok:$3" --kill-on-invalid-dep=yes jobs/study.sbatch "$config" "$1" "${overrides[@]}" \
        | cut -d';' -f1
}
data=$(job study-data "" study --part data --quiet)
train=$(array train "$trainings" "$data")
merge=$(array settings "$settings" "$train")
report=$(job study-report "$merge" study --part report --quiet)
echo "study: data $data → training array $train ($trainings tasks) → settings array $merge ($settings tasks)" \
    "→ report $report"
