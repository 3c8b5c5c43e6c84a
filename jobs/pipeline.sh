#!/usr/bin/env bash
# The whole study as a Slurm dependency DAG (run it on a login node, from the repository root):
#
#   bash jobs/pipeline.sh CONFIG [KEY=VALUE ...]
#
#   demo-data (if the config reads the demo world) → tokenizer → corpus ─┐
#   precompute array (features.num_shards) → link ───────────────────────┴→ [seed run] →
#   text run ∥ multimodal run (or the expert run) → sweep submitter → sweep array (%sweep.array_throttle) → results
#   compact → analyze (the report in reports/<experiment>/report.html)
#
# The sweep's size depends on the checkpoints, so a small job after training plans it and
# submits the array (`--submit-sweep`). Every job skips work that is already complete: the
# same command resumes a broken DAG. `squeue -n vlmerge-analyze` shows when the end is near.
# Cluster options for every job (partition, account, GPUs…) go in VLMERGE_SBATCH_ARGS, e.g.
#   VLMERGE_SBATCH_ARGS="--partition=gpu --gpus-per-node=1 --cpus-per-task=8" bash jobs/pipeline.sh …
set -euo pipefail
mode=all
if [ "${1:-}" = "--submit-sweep" ]; then mode=sweep; shift; fi
config="${1:?usage: bash jobs/pipeline.sh CONFIG [KEY=VALUE ...]}"
shift
overrides=("$@")
source jobs/submit.sh  # sbatch with the site's options, job, value, $logs

if [ "$mode" = sweep ]; then
    read -r tasks per_task < <(python -m vlmerge sweep plan --array --config "$config" "${overrides[@]}")
    throttle="$(value sweep.array_throttle)"
    echo "pipeline: sweep of $tasks array task(s), $per_task item(s) each"
    sweep=$(sbatch --parsable --array="0-$((tasks - 1))%${throttle}" --output="$logs/%x-%A_%a.out" jobs/sweep.sbatch "$config" \
        --per-task "$per_task" "${overrides[@]}" | cut -d';' -f1)
    results=$(job results "$sweep" results compact)
    analysis=$(job analyze "$results" analyze --quiet)
    echo "pipeline: analysis job $analysis writes the report after the sweep"
    exit 0
fi

data=$(job demo-data "" demo-data --quiet --if-needed)
tok=$(job tokenizer "$data" tokenizer --quiet)
corpus=$(job corpus "$tok" corpus --quiet)
shards="$(value features.num_shards)"
pre=$(sbatch --parsable --array="0-$((shards - 1))" --output="$logs/%x-%A_%a.out" --dependency="afterok:${data}" jobs/precompute.sbatch \
    "$config" "${overrides[@]}" | cut -d';' -f1)
link=$(job link "$pre" precompute --quiet --link)
ready="${corpus}:${link}"
if [ "$(value runs.seed_pretraining)" = "True" ]; then
    ready=$(sbatch --parsable --dependency="afterok:${ready}" jobs/pretrain.sbatch "$config" seed \
        "${overrides[@]}" | cut -d';' -f1)
fi
# The runs whose checkpoints the sweep merges: the twins (text ∥ multimodal), the expert run, or all three.
trained=()
for run in $(python -m vlmerge sweep plan --runs --config "$config" "${overrides[@]}"); do
    trained+=("$(sbatch --parsable --dependency="afterok:${ready}" jobs/pretrain.sbatch "$config" "$run" \
        "${overrides[@]}" | cut -d';' -f1)")
done
# The submitter is a plain batch step: it runs this script again, which sbatches the array.
submitter=$(sbatch --parsable --job-name=vlmerge-sweep-submit --cpus-per-task=1 \
    --dependency="afterok:$(IFS=:; echo "${trained[*]}")" \
    jobs/pipeline.sh --submit-sweep "$config" "${overrides[@]}" | cut -d';' -f1)
echo "pipeline: submitted; the sweep is planned by job $submitter once the runs have finished"
