# Sourced by the sbatch scripts whose step trains (pretrain.sbatch, study.sbatch), on the compute node.
# shellcheck shell=bash

# run_requeueable COMMAND...: run the command as the job's step, pass it USR1 (Slurm's warning
# before the time limit; SIGTERM from scancel, requeue or preemption reaches it directly), and
# when it saved its state and exited 75, requeue the job: the next start resumes from that state.
# Returns the command's exit status.
run_requeueable() {
    srun --kill-on-bad-exit=1 "$@" &
    step_pid=$!
    trap 'kill -USR1 "$step_pid" 2>/dev/null' USR1
    wait "$step_pid"
    local rc=$?
    # A trapped signal makes `wait` return early (status > 128): wait for the real exit.
    while [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; do
        wait "$step_pid"
        rc=$?
    done
    if [ "$rc" -eq 75 ]; then
        echo "state saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
