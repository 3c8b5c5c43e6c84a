# Sourced by the DAG scripts (jobs/pipeline.sh, jobs/study.sh) on the login node, after they set
# `config`, the `overrides` array and `dry_run` (1: print every job, submit none): the project's
# python, sbatch with the site's options, `job` and `value`, and the experiment's log folder.
# shellcheck shell=bash
source env/cluster.sh  # the project's python, here on the login node as in the jobs

# Cluster options for every job (partition, account, GPUs…) come from VLMERGE_SBATCH_ARGS.
read -r -a site <<< "${VLMERGE_SBATCH_ARGS:-}"
# VLMERGE_JOB_TAG, where set, becomes every job's Slurm comment, also in the jobs that the DAG's
# submitter jobs submit later (they inherit it): `squeue -o '%i %k'` then tells this DAG's jobs from
# a user's other vlmerge jobs, which share its job names.
if [ -n "${VLMERGE_JOB_TAG:-}" ]; then
    site+=(--comment="$VLMERGE_JOB_TAG")
fi
# A dry run counts its jobs in a file: sbatch runs in a subshell ($(...), pipes) in the scripts.
if [ "${dry_run:-0}" = 1 ]; then
    dry_log=$(mktemp)
    trap 'rm -f "$dry_log"' EXIT
fi
sbatch() {
    if [ "${dry_run:-0}" != 1 ]; then
        command sbatch "${site[@]}" "$@"
        return
    fi
    # A dry run: the job as it would be submitted (ids count from 1), checked by Slurm where Slurm
    # answers (--test-only validates the job and its options against the cluster, submits nothing;
    # the dependencies name jobs that do not exist, so they are left out of the check).
    echo job >> "$dry_log"
    local dry_jobs checked=() arg
    dry_jobs=$(grep -c job "$dry_log" || true)
    for arg in "${site[@]}" "$@"; do
        case "$arg" in --dependency=*|--kill-on-invalid-dep=*|--parsable) ;; *) checked+=("$arg") ;; esac
    done
    printf 'job %d: sbatch' "$dry_jobs" >&2
    printf ' %q' "${site[@]}" "$@" >&2
    echo >&2
    if [ -n "${slurm_answers:-}" ]; then
        local said
        if said=$(command sbatch --test-only "${checked[@]}" 2>&1); then
            echo "       test-only: ${said##*sbatch: }" >&2
        else
            echo "       test-only FAILED: ${said}" >&2
            echo failed >> "$dry_log"
        fi
    fi
    echo "$dry_jobs"
}
if [ "${dry_run:-0}" = 1 ] && command -v sbatch >/dev/null && scontrol ping >/dev/null 2>&1; then
    slurm_answers=1
fi

# One vlmerge stage as a job; sbatch passes the words on as they are (no shell string to quote).
job() {  # job NAME DEPENDENCY VLMERGE ARGS...
    local name="$1" dependency="$2"
    shift 2
    local dep=()
    [ -n "$dependency" ] && dep=(--dependency="afterok:${dependency}" --kill-on-invalid-dep=yes)
    sbatch --parsable --job-name="vlmerge-${name}" "${dep[@]}" jobs/vlmerge.sbatch "$@" \
        --config "$config" "${overrides[@]}" | cut -d';' -f1
}

value() {  # a value of the resolved config
    python -m vlmerge config --get "$1" --config "$config" "${overrides[@]}"
}

# The end of a dry run: how many jobs, and whether Slurm accepted each.
dry_run_summary() {
    local dry_jobs dry_failed
    dry_jobs=$(grep -c job "$dry_log" || true)
    dry_failed=$(grep -c failed "$dry_log" || true)
    if [ -z "${slurm_answers:-}" ]; then
        echo "dry run: $dry_jobs job(s), nothing submitted (no Slurm answers here: the jobs were not checked)"
    elif [ "$dry_failed" -gt 0 ]; then
        echo "dry run: $dry_failed of $dry_jobs job(s) refused by sbatch --test-only" >&2
        return 1
    else
        echo "dry run: $dry_jobs job(s), nothing submitted; sbatch --test-only accepted every one"
    fi
}

# Job logs go under the output root, not into the repository.
logs="$(value paths.root)/logs/$(value experiment)"
[ "${dry_run:-0}" = 1 ] || mkdir -p "$logs"
export SBATCH_OUTPUT="$logs/%x-%j.out"  # sbatch's own variable: every sbatch below writes there
