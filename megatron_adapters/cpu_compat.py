"""The only place where megatron-core is adapted to run without CUDA (CPU + gloo).

megatron-core 0.16.1 (the pinned version) assumes a GPU in three places, found by running the
parallel tests on CPU and reading the library's source:

1. `torch.cuda.current_device()` as the device of sequence-parallel buffers
   (megatron/core/tensor_parallel/mappings.py), pipeline p2p buffers and the global memory
   buffer;
2. `torch.zeros(..., device="cuda")` inside the pipeline schedules
   (megatron/core/pipeline_parallel/schedules.py);
3. `torch.cuda.synchronize()` after batched p2p (pipeline_parallel/p2p_communication.py) and
   in dist_checkpointing saves.

Every CPU run of the project goes through these patches: megatron_adapters/groups.py applies
them in `initialize_parallel`, and tests/parallel/ runs each layout on CPU with gloo.

`apply_cpu_patches()` fixes 1 and 3 process-wide, `cuda_to_cpu()` is a context manager
that fixes 2 around a schedule call. Both do nothing when CUDA is available, so the same
code runs unchanged on GPUs with NCCL. Nothing here is applied at import time.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

_PATCHED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_patches() -> bool:
    """Patch torch.cuda for megatron-core when there is no GPU. Idempotent; returns whether
    the patches are active."""
    global _PATCHED
    if cuda_available():
        return False
    if not _PATCHED:
        # megatron passes this straight to `device=`; a torch.device works where an index would.
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        # A CUDA stream-scheduling hint megatron prints for every TP linear; meaningless here.
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
        _PATCHED = True
    return True


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites a CUDA device in tensor factories, `.to()` and `.cuda()` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(torch.device("cpu") if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def cuda_to_cpu():
    """Context manager for megatron code that creates tensors on "cuda" (pipeline schedules)."""
    if cuda_available():
        return contextlib.nullcontext()
    return _CudaToCpuMode()
