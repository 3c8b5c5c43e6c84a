# Sourced by the DAG scripts (jobs/pipeline.sh, jobs/study.sh) on the login node, after they set
# `config` and the `overrides` array: the project's python, sbatch with the site's options,
# `job` and `value`, and the experiment's log folder.
# shellcheck shell=bash
source env/cluster.sh  # the project's python, here on the login node as in the jobs

# Cluster options for every job (partition, account, GPUs…) come from VLMERGE_SBATCH_ARGS.
read -r -a site <<< "${VLMERGE_SBATCH_ARGS:-}"
sbatch() { command sbatch "${site[@]}" "$@"; }

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

# Job logs go under the output root, not into the repository.
logs="$(value paths.root)/logs/$(value experiment)"
mkdir -p "$logs"
export SBATCH_OUTPUT="$logs/%x-%j.out"  # sbatch's own variable: every sbatch below writes there
