"""Tensor-parallel building blocks: megatron-core layers configured for Hyena-GLT and a
vocab-parallel cross entropy that keeps fp64 (what megatron_adapters.spec hands the model).

Weights are never initialised by megatron (`perform_initialization=False`): the builder
draws each full tensor from the single-device init rule and keeps this rank's slice, so
every layout starts from identical weights.
"""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig
from megatron.core.transformer import TransformerConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from hyena_glt.config import HyenaGLTConfig

from .cpu_compat import cuda_available
from .parallel_config import ParallelConfig


def no_init(_weight: torch.Tensor) -> None:  # the builder fills weights from the canonical init
    return None


def megatron_config(pcfg: ParallelConfig, cfg: HyenaGLTConfig, dtype: torch.dtype) -> TransformerConfig:
    """The megatron config our layers and the pipeline schedules read. TransformerConfig, not
    ModelParallelConfig, because the schedules read a few of its fields (hidden_size for
    the p2p buffers, calculate_per_token_loss, offloading flags); none of megatron's
    transformer layers are built from it."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.num_heads,
        tensor_model_parallel_size=pcfg.tp,
        context_parallel_size=pcfg.cp,
        pipeline_model_parallel_size=pcfg.pp,
        virtual_pipeline_model_parallel_size=pcfg.vpp,
        sequence_parallel=pcfg.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,  # build on the host, move to the device afterwards
        perform_initialization=False,
        # The loss function already divides by the global token weight: the schedules must not
        # divide again by the micro-batch count or multiply by the CP size.
        calculate_per_token_loss=True,
        # Interleaved 1F1B with pp=2 sends activation and gradient to the same peer in one
        # batch_isend_irecv; matched in posting order they arrive swapped (same shape, no error).
        # Unbatched p2p puts the two directions on different communicators.
        batch_p2p_comm=pcfg.vpp is None,
        # batch_isend_irecv + cuda.synchronize() is a GPU-only workaround.
        batch_p2p_sync=cuda_available(),
    )


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear without bias that returns just the output tensor. Under sequence
    parallelism it all-gathers the sequence first (inside megatron's linear)."""

    def __init__(self, d_in: int, d_out: int, mcfg: ModelParallelConfig):
        super().__init__(d_in, d_out, config=mcfg, init_method=no_init, bias=False, gather_output=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, weight)[0]


class RowLinear(RowParallelLinear):
    """RowParallelLinear, input already split; all-reduce (or reduce-scatter under sequence
    parallelism) of the partial outputs, then the bias (replicated; megatron tags it
    `sequence_parallel` so its gradient is summed over TP under SP)."""

    def __init__(self, d_in: int, d_out: int, mcfg: ModelParallelConfig, bias: bool = False):
        super().__init__(
            d_in, d_out, config=mcfg, init_method=no_init, bias=bias, input_is_parallel=True, skip_bias_add=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class VocabEmbedding(VocabParallelEmbedding):
    """Vocab-parallel embedding; the lookup's partial sums are all-reduced over TP (not
    reduce-scattered: genomic additions and the SP scatter come after it)."""

    def __init__(self, vocab: int, d_model: int, mcfg: ModelParallelConfig):
        super().__init__(vocab, d_model, init_method=no_init, config=mcfg)


class OutputLayer(ColumnParallelLinear):
    """Vocab-parallel output layer. Tied: holds no weight, the embedding's shard is passed in."""

    def __init__(self, d_model: int, vocab: int, mcfg: ModelParallelConfig, tied: bool):
        super().__init__(
            d_model, vocab, config=mcfg, init_method=no_init, bias=False, gather_output=False,
            skip_weight_param_allocation=tied,
        )

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, weight)[0]


class _VocabParallelCE(torch.autograd.Function):
    """megatron-core's vocab-parallel cross entropy, computed in max(logits dtype, fp32)
    instead of always fp32, and on a copy (megatron's version edits the logits in place)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        group = ps.get_tensor_model_parallel_group()
        compute = torch.promote_types(logits.dtype, torch.float32)
        work = logits.to(compute, copy=True)
        logits_max = work.max(dim=-1)[0]
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            work.shape[-1], ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        )
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(work, target, logits_max, start, end)
        )
        torch.distributed.all_reduce(predicted, group=group)
        torch.distributed.all_reduce(sum_exp, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
            softmax, target_mask
        )
        grad = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, update.to(grad_2d.dtype), grad_input, grad_loss.to(grad_2d.dtype)
        )
        return grad.to(ctx.in_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token CE from vocab-sharded logits (..., V/tp); target (...) holds global ids."""
    return _VocabParallelCE.apply(logits, target)
