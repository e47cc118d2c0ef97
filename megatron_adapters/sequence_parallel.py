"""Sequence parallelism (Megatron style) inside each tensor-parallel group.

Between the row-parallel output of one block and the column-parallel input of the next
(norms, residual adds, conservation gate), activations are split along the sequence over
the TP ranks instead of being replicated:

    embedding -> scatter (split sequence) -> [norm -> column linear (all-gather sequence)
    -> Hyena/attention/MLP with channels sharded -> row linear (reduce-scatter sequence)
    -> residual add] x layers -> final norm -> output layer (all-gather sequence)

The all-gather / reduce-scatter live inside megatron's ColumnParallelLinear and
RowParallelLinear (config.sequence_parallel); the Hyena convolutions need nothing
special because they run between the two, on the full (CP-local) sequence. Parameters
used inside the split region (norm weights, conservation gate) see only part of the
sequence on each TP rank, so their gradients are summed over TP after backward; the model
tags them `sequence_parallel = True` (ModelSpec.mark_sequence_split), the attribute
megatron-core uses for the same purpose.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region


def enter(x: torch.Tensor) -> torch.Tensor:
    """Sequence-first (s, B, D) replicated -> this TP rank's s/tp slice (backward: all-gather)."""
    return scatter_to_sequence_parallel_region(x)


def local_rows(t: torch.Tensor, tp: int, tp_rank: int, enabled: bool, dim: int = 0) -> torch.Tensor:
    """This TP rank's slice of a per-position tensor that needs no gradient (e.g. conservation)."""
    return t.chunk(tp, dim=dim)[tp_rank] if enabled else t


def allreduce_sequence_parallel_grads(params, tp_group: dist.ProcessGroup) -> None:
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads or tp_group.size() == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=tp_group)
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(r)
