"""CPU threads follow the allotment (affinity mask, SLURM_CPUS_PER_TASK, compute.threads); idle threads sleep."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from vlmerge.errors import VlmergeError
from vlmerge.launch import allotted_cpus, use_allotted_cpus

MASK = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("slurm, expected", [(None, MASK), ("1", 1), (str(MASK + 8), MASK)])
def test_allotted_cpus_is_the_mask_narrowed_by_slurm(slurm, expected):
    env = {} if slurm is None else {"SLURM_CPUS_PER_TASK": slurm}
    assert allotted_cpus(env) == expected


def test_use_allotted_cpus_keeps_what_the_launcher_set_unless_the_config_says():
    env = {"SLURM_CPUS_PER_TASK": "1"}
    assert use_allotted_cpus(0, env) == 1 and env == {"SLURM_CPUS_PER_TASK": "1", "OMP_WAIT_POLICY": "PASSIVE",
                                                      "OMP_NUM_THREADS": "1"}
    torchrun = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}  # set by the user or the launcher
    assert use_allotted_cpus(0, torchrun) == 3 and torchrun["OMP_WAIT_POLICY"] == "ACTIVE"
    assert use_allotted_cpus(5, torchrun) == 5 and torchrun["OMP_NUM_THREADS"] == "5"  # compute.threads wins
    with pytest.raises(VlmergeError, match="OMP_NUM_THREADS='two': expected a whole number"):
        use_allotted_cpus(0, {"OMP_NUM_THREADS": "two"})


PROBE = """
import os, sys
from vlmerge.cli import main
assert "torch" not in sys.modules  # the CLI sizes the pools before a stage loads torch
main(["config", "--get", "experiment", *sys.argv[1:]])
import torch
print(os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"], torch.get_num_threads())
"""


@pytest.mark.parametrize("overrides, expected", [([], "PASSIVE 1 1"), (["compute.threads=2"], "PASSIVE 2 2")])
def test_every_command_runs_with_the_allotted_threads_and_passive_waits(overrides, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "SLURM_"))}
    r = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, cwd=REPO,
                       env={**env, "SLURM_CPUS_PER_TASK": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == expected
