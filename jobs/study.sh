#!/usr/bin/env bash
# Sung et al.'s study (`vlmerge study`) as a Slurm DAG (run it on a login node, from the repository root):
#
#   bash jobs/study.sh CONFIG [KEY=VALUE ...]
#
#   data (world, tokenizer, corpus, features) → training array: the agnostic baseline (MAA) and each
#   seed run → settings array: one expert run (variant, K_seed) per task → items array: the sweep's
#   work items of one unit (MAA, or one setting's merges, MSA and distances) per task → fine-tuning
#   array: one unit's models on one task of study.finetune per task (none without study.finetune)
#   → report (reports/<experiment>/sung/)
#
# Every job skips what is done: the same command resumes a broken DAG. Cluster options for every job
# go in VLMERGE_SBATCH_ARGS, and VLMERGE_JOB_TAG tags its jobs, as for jobs/pipeline.sh.
set -euo pipefail
config="${1:?usage: bash jobs/study.sh CONFIG [KEY=VALUE ...]}"
shift
overrides=("$@")
source jobs/submit.sh  # sbatch with the site's options, job, value, $logs

read -r trainings settings units finetunes < <(python -m vlmerge study --array --config "$config" "${overrides[@]}")
array() {  # array PART TASKS DEPENDENCY: one of the study's arrays
    sbatch --parsable --job-name="vlmerge-study-$1" --array="0-$(($2 - 1))" --output="$logs/%x-%A_%a.out" \
        --dependency="afterok:$3" --kill-on-invalid-dep=yes jobs/study.sbatch "$config" "$1" "${overrides[@]}" \
        | cut -d';' -f1
}
data=$(job study-data "" study --part data --quiet)
train=$(array train "$trainings" "$data")
experts=$(array settings "$settings" "$train")
items=$(array items "$units" "$experts")
last=$items
if [ "$finetunes" -gt 0 ]; then
    last=$(array finetune "$finetunes" "$items")
fi
report=$(job study-report "$last" study --part report --quiet)
echo "study: data $data → training array $train ($trainings tasks) → settings array $experts ($settings tasks)" \
    "→ items array $items ($units tasks) → fine-tuning array ${last/#$items/none} ($finetunes tasks) → report $report"
