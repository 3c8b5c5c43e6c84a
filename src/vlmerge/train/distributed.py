"""The process group, from torch.distributed's variables: torchrun sets them, `vlmerge.launch`
sets them under srun, and a plain process is rank 0 of 1 on a free local port."""

from __future__ import annotations

import logging
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """The rendezvous variables of a process that is the whole job."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


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
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
