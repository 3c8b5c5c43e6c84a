"""Where a stage runs its model: `compute.device` (auto | cpu | cuda | cuda:N) made a torch device.

`auto` is the GPU when this process sees one (on a Slurm GPU node: the GPU Slurm gave the task,
through CUDA_VISIBLE_DEVICES), else the CPU. On a GPU, fp32 means fp32: TF32 is turned off for
matrix products and convolutions, so that an fp32 score on the GPU is an fp32 score on the CPU up
to summation order (bf16 is asked for by name, `eval.dtype: bf16`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vlmerge.errors import VlmergeError

if TYPE_CHECKING:
    import torch

DEVICE_RULE = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str) -> str:
    """`spec` when it is a device setting; else ValueError (for the config's validation)."""
    if not _SPEC.fullmatch(spec):
        raise ValueError(f"expected {DEVICE_RULE}")
    return spec


def pick_device(spec: str, cuda_count: int, key: str = "compute.device") -> str:
    """'cpu' or 'cuda:N' for the setting `spec` (of config key `key`), given the number of GPUs this
    process sees."""
    check_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and cuda_count == 0):
        return "cpu"
    if spec == "auto":
        return "cuda:0"
    index = int(spec.partition(":")[2] or 0)
    if cuda_count == 0:
        raise VlmergeError(f"{key} {spec}: no CUDA GPU is visible to this process (a CPU build of torch, "
                           "no driver, or CUDA_VISIBLE_DEVICES empty); use auto or cpu")
    if index >= cuda_count:
        raise VlmergeError(f"{key} {spec}: this process sees {cuda_count} GPU(s), cuda:0 … "
                           f"cuda:{cuda_count - 1}")
    return f"cuda:{index}"


def cuda_count() -> int:
    """The GPUs this process sees (0 with a CPU build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str, key: str = "compute.device") -> torch.device:
    """The torch device of `spec`; a GPU becomes the process's current device, with TF32 off."""
    import torch

    device = torch.device(pick_device(spec, cuda_count(), key))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device
