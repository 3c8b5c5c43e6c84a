"""The process group, from torch.distributed's variables: torchrun sets them, `vlmerge.launch`
sets them under srun, and a plain process is rank 0 of 1 on a free local port."""

from __future__ import annotations

import logging
import os
import socket

from vlmerge.errors import VlmergeError

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
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # DeepSpeed logs every setup step at INFO
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(single_process_env())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_gpu(int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
