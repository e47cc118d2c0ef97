"""Gradient reductions after backward, split in two so an outer engine can own the second.

1. `finalize_model_parallel_grads` (always needed): sum over TP the gradients of
   sequence-parallel parameters, and sum the tied embedding / output weight gradients
   over the embedding group (first + last pipeline stage) so both copies take the same
   optimizer step and stay identical.
2. `reduce_gradients_dp_cp` (skip it when DeepSpeed ZeRO reduces gradients itself): sum
   over data parallel x context parallel. CP ranks see different tokens and, for the
   `D`/`H` filters, produce gradients only for their own channel slice, so reducing over
   DP alone would be wrong. It is a *sum* because every rank's loss is already divided
   by the global token weight (see build.ParallelModel.forward_backward).

`allreduce_reached_grads` is the data-parallel sum for a model whose loss does not reach
every parameter every step (replicated.ReplicatedModel: a multi-task model trains one
task's head per step): the parameters with a gradient on any rank are summed, the others
keep grad None on every rank, as on one process, so AdamW leaves them alone.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from .sequence_parallel import allreduce_sequence_parallel_grads

_BUCKET_NUMEL = 1 << 24


def allreduce_coalesced(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum tensors over `group` in a few flat buckets (one collective per bucket and dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        bucket, size = [], 0
        for g in same + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= _BUCKET_NUMEL):
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                for t, r in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    t.copy_(r)
                bucket, size = [], 0


def allreduce_reached_grads(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Sum over `group` the gradients of the parameters that have one on any rank (a rank
    whose loss did not reach a parameter, or that had no examples, contributes zeros)."""
    if group.size() == 1:
        return
    device = params[0].device if params else torch.device("cpu")
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(reached, group=group)
    grads = []
    for p, r in zip(params, reached.tolist()):
        if r:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    allreduce_coalesced(grads, group)


def _params(chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad]


def sync_tied_embedding_grads(chunks: list[nn.Module]) -> None:
    """Sum the gradients of the parameters both end stages hold (the embedding and the tied
    output-weight copy; the U-shape's segment encodings) over the first and last stage."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    # Both ends hold the same names: summed in name order, they pair up.
    shared = sorted((n, p) for c in chunks for n, p in c.named_parameters() if getattr(p, "shared_embedding", False))
    if not shared:  # untied output layer, plain model: nothing is shared
        return
    for _, p in shared:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    allreduce_coalesced([p.grad for _, p in shared], ps.get_embedding_group())


def finalize_model_parallel_grads(chunks: list[nn.Module]) -> None:
    params = _params(chunks)
    if ps.get_tensor_model_parallel_world_size() > 1:
        allreduce_sequence_parallel_grads(params, ps.get_tensor_model_parallel_group())
    sync_tied_embedding_grads(chunks)


def reduce_gradients_dp_cp(chunks: list[nn.Module]) -> None:
    """Sum every gradient over the data-parallel x context-parallel group."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if group.size() == 1:
        return
    grads = []
    for p in _params(chunks):
        if p.grad is None:  # same on every rank of the group: they all run the same layers
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    allreduce_coalesced(grads, group)
