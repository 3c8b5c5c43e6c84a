# Sourced by every jobs/*.sbatch script, on the compute node, from the submit directory.
# Adapt the module lines to your site; everything else is derived from the Slurm environment.

# module load python/3.11 cuda/12.4        # site-specific: uncomment and adapt

# The project's virtualenv (made by `make setup`, or point VLMERGE_VENV at your own).
VLMERGE_VENV="${VLMERGE_VENV:-$PWD/.venv}"
if [ ! -x "$VLMERGE_VENV/bin/python" ]; then
    echo "env/cluster.sh: no virtualenv at $VLMERGE_VENV; run 'make setup' first" >&2
    return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$VLMERGE_VENV/bin/activate"

# Never touch the network for weights. (vlmerge sizes its CPU threads from the allocation itself:
# vlmerge.launch.use_allotted_cpus; an OMP_NUM_THREADS exported here or at submission wins.)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
