#!/usr/bin/env bash
# The whole study as a Slurm dependency DAG (run it on a login node, from the repository root):
#
#   bash jobs/pipeline.sh [--dry-run] CONFIG [KEY=VALUE ...]
#
#   demo-data (if the config reads the demo world) → tokenizer → corpus ─┐
#   precompute array (features.num_shards) → link ───────────────────────┴→ [seed run] →
#   text run ∥ multimodal run (or the expert run) → [best text checkpoint] → sweep submitter → sweep array
#   (%sweep.array_throttle) → [fine-tuning submitter → fine-tuning array] → results compact → analyze
#   (the report in reports/<experiment>/report.html)
#
# The sweep's size depends on the checkpoints, so a small job after training plans it and
# submits the array (`--submit-sweep`); with compute.device=cuda each array task asks for one GPU.
# Likewise the fine-tuning of sweep.finetune (an α of "best" is read from the sweep's results): a
# small job after the sweep plans and submits its array (`--submit-finetune`), the compaction and the analysis.
# Every job skips work that is already complete: the same command resumes a broken DAG.
# `squeue -n vlmerge-analyze` shows when the end is near. --dry-run prints every job (its options,
# array and dependencies) and submits none; where Slurm answers, each is checked with
# `sbatch --test-only`. Cluster options for every job (partition, account, GPUs…) go in
# VLMERGE_SBATCH_ARGS, e.g.
#   VLMERGE_SBATCH_ARGS="--partition=gpu --gpus-per-node=1 --cpus-per-task=8" bash jobs/pipeline.sh …
# VLMERGE_JOB_TAG=NAME tags every job of this DAG (Slurm's comment), so that a script can wait on
# its own jobs: `squeue -h -o '%k %i' | grep "^NAME "`.
set -euo pipefail
mode=all
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --submit-sweep) mode=sweep; shift ;;
        --submit-finetune) mode=finetune; shift ;;
        --dry-run) dry_run=1; shift ;;
        *) break ;;
    esac
done
config="${1:?usage: bash jobs/pipeline.sh [--dry-run] CONFIG [KEY=VALUE ...]}"
shift
overrides=("$@")
source jobs/submit.sh  # sbatch with the site's options, job, value, $logs

# The sweep array (sized by the plan), then the compaction and the analysis after it.
submit_sweep() {  # submit_sweep DEPENDENCY ("": none)
    local tasks per_task gpus dep=() gpu=()
    read -r tasks per_task gpus < <(python -m vlmerge sweep plan --array --config "$config" "${overrides[@]}")
    [ -n "$1" ] && dep=(--dependency="afterok:$1" --kill-on-invalid-dep=yes)
    [ "$gpus" -gt 0 ] && gpu=(--gpus-per-task="$gpus")
    echo "pipeline: sweep of $tasks array task(s), $per_task item(s) each" >&2
    local sweep results analysis
    sweep=$(sbatch --parsable --array="0-$((tasks - 1))%$(value sweep.array_throttle)" "${gpu[@]}" "${dep[@]}" \
        --output="$logs/%x-%A_%a.out" jobs/sweep.sbatch "$config" --per-task "$per_task" "${overrides[@]}" | cut -d';' -f1)
    if [ "$(value sweep.finetune)" = "[]" ]; then
        results=$(job results "$sweep" results compact)
        analysis=$(job analyze "$results" analyze --quiet)
        echo "pipeline: analysis job $analysis writes the report after the sweep" >&2
    else
        local submitter
        submitter=$(sbatch --parsable --job-name=vlmerge-finetune-submit --cpus-per-task=1 \
            --dependency="afterok:${sweep}" --kill-on-invalid-dep=yes \
            jobs/pipeline.sh --submit-finetune "$config" "${overrides[@]}" | cut -d';' -f1)
        echo "pipeline: job $submitter submits the fine-tuning array, the compaction and the analysis after the sweep" >&2
    fi
}

# The fine-tuning array of sweep.finetune (one item per model and task), then the compaction and the analysis.
submit_finetune() {
    local n gpus gpu=() finetune results analysis
    n=$(python -m vlmerge sweep finetune --array --config "$config" "${overrides[@]}")
    gpus=$(python -m vlmerge sweep plan --gpus --config "$config" "${overrides[@]}")
    [ "$gpus" -gt 0 ] && gpu=(--gpus-per-task="$gpus")
    finetune=$(sbatch --parsable --array="0-$((n - 1))%$(value sweep.array_throttle)" "${gpu[@]}" \
        --output="$logs/%x-%A_%a.out" jobs/finetune.sbatch "$config" "${overrides[@]}" | cut -d';' -f1)
    results=$(job results "$finetune" results compact)
    analysis=$(job analyze "$results" analyze --quiet)
    echo "pipeline: fine-tuning array $finetune ($n items), then compaction $results and analysis $analysis" >&2
}

if [ "$mode" = sweep ]; then
    submit_sweep ""
    exit 0
fi
if [ "$mode" = finetune ]; then
    submit_finetune
    exit 0
fi

[ "$dry_run" = 1 ] && echo "pipeline (dry run): $config ${overrides[*]}" >&2
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
planned=$(IFS=:; echo "${trained[*]}")
# pairing best_text: every checkpoint of both twins is scored on the best-text data (the text twin's
# pick the best; both are the paper's Fig. 3), in a job of the sweep's device (the scores are kept in
# results/<exp>/best_text.json, which the plan then reads)
if [ "$(value sweep.pairing)" = best_text ]; then
    gpu=()
    gpus=$(python -m vlmerge sweep plan --gpus --config "$config" "${overrides[@]}")
    [ "$gpus" -gt 0 ] && gpu=(--gpus-per-task="$gpus")
    planned=$(sbatch --parsable --job-name=vlmerge-best-text "${gpu[@]}" --dependency="afterok:${planned}" \
        --kill-on-invalid-dep=yes jobs/vlmerge.sbatch sweep plan --quiet --config "$config" "${overrides[@]}" \
        | cut -d';' -f1)
fi
# The submitter is a plain batch step: it runs this script again, which sbatches the array.
submitter=$(sbatch --parsable --job-name=vlmerge-sweep-submit --cpus-per-task=1 --dependency="afterok:${planned}" \
    jobs/pipeline.sh --submit-sweep "$config" "${overrides[@]}" | cut -d';' -f1)
if [ "$dry_run" = 1 ]; then
    # What the submitter will submit, when the runs' checkpoints are there to plan from
    if python -m vlmerge sweep plan --array --config "$config" "${overrides[@]}" >/dev/null 2>&1; then
        echo "job $submitter submits, once the runs are trained:" >&2
        submit_sweep "$submitter"
    else
        echo "job $submitter plans the sweep array once the runs are trained (no checkpoints to size it from yet;" \
             "vlmerge sweep plan --estimate --words-per-epoch RUN=N projects it)" >&2
    fi
    dry_run_summary
    exit
fi
echo "pipeline: submitted; the sweep is planned by job $submitter once the runs have finished"
