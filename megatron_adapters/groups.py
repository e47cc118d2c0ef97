"""Process groups for a layout, built by megatron-core's `parallel_state`.

`initialize_parallel` validates first (no group is created for a layout that cannot run),
starts torch.distributed if needed (NCCL on GPUs, gloo otherwise), applies the CPU patches
only when CUDA is unavailable, then lets megatron-core build every group. `RankContext`
is the read-only view the parallel modules use: this rank's coordinates and groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from hyena_glt.config import HyenaGLTConfig

from .cpu_compat import apply_cpu_patches, cuda_available
from .parallel_config import Layout, ParallelConfig, RankCoords, make_layout


def parallel_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def initialize_parallel(
    pcfg: ParallelConfig,
    model_cfg: HyenaGLTConfig,
    seq_length: int | None = None,
    *,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> Layout:
    """Validate the layout, then build megatron-core's groups. Returns the validated Layout.

    Works under torchrun (reads WORLD_SIZE / LOCAL_RANK) or after the caller has already
    called `torch.distributed.init_process_group` (e.g. DeepSpeed's init_distributed).
    """
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    layout = make_layout(pcfg, model_cfg, world_size, seq_length)  # raises before any group exists
    apply_cpu_patches()  # no-op with CUDA
    if not dist.is_initialized():
        if cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = backend or ("nccl" if cuda_available() else "gloo")
        if world_size == 1 and "MASTER_ADDR" not in os.environ:  # a plain `python` run: one process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        virtual_pipeline_model_parallel_size=pcfg.vpp,
        context_parallel_size=pcfg.cp,
        distributed_timeout_minutes=timeout_minutes,
        # On CPU the main groups already are gloo groups; extra gloo copies would only cost time.
        create_gloo_process_groups=cuda_available(),
    )
    ctx = RankContext.current(layout)
    mine = ctx.coords
    theirs = RankCoords(
        tp=ps.get_tensor_model_parallel_rank(),
        cp=ps.get_context_parallel_rank(),
        dp=ps.get_data_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_rank(),
    )
    if mine != theirs:  # the offline rank map (used by shard_state_dict) must match megatron's
        raise RuntimeError(f"rank {dist.get_rank()}: rank_coords {mine} != megatron-core groups {theirs}")
    return layout


def destroy_parallel() -> None:
    """Tear down megatron's groups (and torch.distributed) so a process can start another layout."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class RankContext:
    """This rank's place in the layout plus the groups it talks to."""

    layout: Layout
    rank: int
    coords: RankCoords
    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup

    @classmethod
    def current(cls, layout: Layout) -> "RankContext":
        rank = dist.get_rank()
        return cls(
            layout=layout,
            rank=rank,
            coords=layout.coords(rank),
            tp_group=ps.get_tensor_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        )

    @property
    def pcfg(self) -> ParallelConfig:
        return self.layout.parallel

    @property
    def tp(self) -> int:
        return self.pcfg.tp

    @property
    def cp(self) -> int:
        return self.pcfg.cp

    @property
    def sp(self) -> bool:
        return self.pcfg.sp

    @property
    def is_last_pp_rank(self) -> bool:
        return self.coords.pp == self.pcfg.pp - 1
