"""Pipeline parallelism through megatron-core's schedules.

`get_forward_backward_func` picks no pipelining (pp=1), 1F1B (pp>1) or interleaved 1F1B
(pp>1 with virtual stages, several model chunks per rank). Stage boundaries come from
`parallel_config.stage_layers` (even by default, or the '|' marks of the pattern, uneven
allowed); chunk v of pipeline rank r is virtual stage v*pp + r, megatron's interleaving.
The first stage embeds, the last computes logits and the loss; with tied embeddings the
last stage holds its own copy of the embedding, initialised identically and kept equal by
summing both copies' gradients over megatron's embedding group (grads.py).
"""

from __future__ import annotations

from typing import Callable

from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

from .cpu_compat import cuda_to_cpu


def check_num_microbatches(num_microbatches: int, pp: int, vpp: int | None) -> None:
    if num_microbatches < 1:
        raise ValueError("need at least one micro-batch")
    if vpp and num_microbatches % pp:
        raise ValueError(
            f"the interleaved pipeline schedule needs a multiple of pp={pp} micro-batches, got {num_microbatches}"
        )


def run_schedule(
    chunks: list[nn.Module],
    local_micro_batches: list[dict],
    forward_step: Callable,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list:
    """Run megatron's schedule over the micro-batches; returns the loss functions' third
    outputs (one per micro-batch) on the last stage, [] elsewhere."""
    interleaved = len(chunks) > 1
    iters = [iter(local_micro_batches) for _ in chunks]  # every chunk walks the same micro-batches
    fb = get_forward_backward_func()
    with cuda_to_cpu():  # the schedules allocate small tensors on "cuda"
        return fb(
            forward_step_func=forward_step,
            data_iterator=iters if interleaved else iters[0],
            model=chunks if interleaved else chunks[0],
            num_microbatches=len(local_micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
