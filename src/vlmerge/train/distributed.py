"""The process group, from torch.distributed's variables: torchrun sets them, `vlmerge.launch`
sets them under srun, and a plain process is rank 0 of 1 on a free local port."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.locks import hold

# DeepSpeed's shared-memory communication op (a C++ extension it compiles on first use on the CPU)
# serves only its inference all-reduce (`inference_all_reduce`, tensor parallelism); training
# all-reduces through torch.distributed. Its build waits on torch's lock file in the extension
# folder, which names no process: a process killed mid-build left a lock that made every later
# training on the machine wait forever, without a word (issue 28). Training never builds it.
SHM_OP = "deepspeed_shm_comm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """The rendezvous variables of a process that is the whole job."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


def local_gpu(local_rank: int, visible: int) -> int:
    """The GPU index of this rank on its node: its own when the task sees only one (Slurm's
    --gpus-per-task=1), else its local rank among the node's (torchrun, --gpus-per-node=N)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise VlmergeError(f"local rank {local_rank} but this process sees {visible} GPU(s): give each task its own "
                           "GPU (--gpus-per-task=1) or every task the node's (--gpus-per-node=N, N = tasks per node)")
    return local_rank


def setup() -> tuple[int, int]:
    """Start the process group from the rendezvous variables; return (rank, world size)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # DeepSpeed logs every setup step at INFO
    if get_accelerator().get_op_builder("ShareMemCommBuilder") is not None:  # the CPU's (a GPU has none)
        deepspeed.ops.__compatible_ops__[SHM_OP] = False  # DeepSpeed keeps this one dict: the edit holds
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(single_process_env())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_gpu(int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


@contextlib.contextmanager
def held_by_rank0(path: Path, what: str, job: tuple[str, int] = ("", 0)) -> Iterator[None]:
    """The lock `path` held for the whole job: rank 0 takes it (every rank of a job shares the run
    folder, so one holder per job) and every rank learns whether it could, so that all ranks stop
    with the same one-line error when another job holds it."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with contextlib.ExitStack() as stack:
        refused = [None]
        if rank == 0:
            try:
                stack.enter_context(hold(path, what, job=job))
            except VlmergeError as e:
                refused = [str(e)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(refused, src=0)
        if refused[0] is not None:
            raise VlmergeError(refused[0])
        yield
