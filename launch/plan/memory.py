"""Per-rank memory of a training layout, by formula: the one memory model of `train --dry-run`
and `hyena-glt plan` (docs/planning.md states the formulas beside the measured peaks).

fp32 weights, gradients and Adam states per ZeRO stage; activations per micro-batch with and
without activation checkpointing, for each pipeline rank (TP ranks of one stage hold the same
amounts), times the micro-batches a pipeline rank holds at once; and the communication
buffers the step allocates beside them (the flat gradient bucket of the data-parallel sum,
the K/V context-parallel gathers).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

from hyena_glt.kinds import CP_SEND_KV, layer_kind

MIB = 2**20
FP32 = 4
# megatron_adapters.grads sums gradients in flat buckets of at most this many values
GRAD_BUCKET_NUMEL = 1 << 24


@dataclass(frozen=True)
class RankEstimate:
    pp_rank: int
    params: int  # parameters this rank holds: its TP slice of its pipeline stages' parameters
    layers: int
    weights: int  # bytes
    grads: int
    optimizer: int
    activations: int  # bytes per micro-batch, no activation checkpointing
    activations_recompute: int  # bytes per micro-batch, activation checkpointing
    in_flight: float  # micro-batches whose activations are held at once (pipeline warm-up)
    recompute: bool  # train.activation_checkpointing
    buffers: int = 0  # communication buffers of a step (gradient bucket copy)
    workspace: int = 0  # the backward's transient buffers of one block (the first block backward meets)

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def activation_peak(self) -> int:
        per_mb = self.activations_recompute if self.recompute else self.activations
        return math.ceil(per_mb * self.in_flight)

    @property
    def total(self) -> int:
        return self.states + self.activation_peak + self.buffers + self.workspace


def state_bytes(params: int, zero_stage: int, dp_cp: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes of `params` fp32 parameters; ZeRO partitions over
    its data-parallel group, dp x cp. ZeRO-1/2 keep an fp32 master partition beside the Adam
    states; ZeRO-3's fp32 partition is the weights themselves."""
    part = lambda n: math.ceil(n / dp_cp)  # noqa: E731
    p = params * FP32
    if zero_stage == 0:
        return p, p, 2 * p
    if zero_stage == 1:
        return p, p, part(3 * p)
    if zero_stage == 2:
        return p, part(p), part(3 * p)
    return part(p), part(p), part(2 * p)


@dataclass(frozen=True)
class _Params:
    """Parameter counts of a model by placement, for one TP size: per layer, and the ones
    outside layers for each (first stage, last stage) combination a pipeline rank can be."""

    per_layer: tuple[int, ...]
    outside: dict  # (first, last) -> count


@functools.lru_cache(maxsize=64)
def _param_counts(model_json: str, tp: int) -> _Params:
    from hyena_glt.config import HyenaGLTConfig
    from megatron_adapters.sharding import (
        canonical_params,
        held_by_stage,
        layer_index,
        tp_split_dim,
    )

    cfg = HyenaGLTConfig.model_validate_json(model_json)
    per_layer = [0] * cfg.num_layers
    outside = dict.fromkeys([(True, True), (True, False), (False, True), (False, False)], 0)
    for name, t in canonical_params(cfg).items():
        n = t.numel() // (tp if tp_split_dim(name) is not None else 1)
        idx = layer_index(name)
        if idx is not None:
            per_layer[idx] += n
            continue
        for first, last in outside:
            if held_by_stage(name, set(), first=first, last=last, tied=cfg.tie_embeddings):
                outside[first, last] += n
    return _Params(tuple(per_layer), outside)


def model_params(cfg) -> int:
    """Parameters of the single-device model."""
    counts = _param_counts(cfg.model_dump_json(), 1)
    return sum(counts.per_layer) + counts.outside[True, True]


def layer_values(code: str, cfg, seq_len: int, tp: int, sp: bool, cp: int = 1) -> tuple[float, float]:
    """(values kept per token for backward, of them the block input) for one block on one
    rank: norms and residuals 4 x d_model (/tp under SP), the gated MLP 4 x hidden/tp, the
    mixer what its layer kind declares (`LayerKind.activations`, hyena_glt/kinds.py), and
    under CP the K/V an attention block gathers from the other cp - 1 ranks (its `kv`
    exchange, kept for backward). Measured against autograd: docs/planning.md#activations."""
    rep = cfg.d_model / tp if sp else cfg.d_model
    mlp = 4 * cfg.mlp_hidden / tp
    kind = layer_kind(code)
    mixer = kind.activations(cfg, seq_len, tp)
    if cp > 1 and kind.cp_sends:
        mixer += sum(x.channels / tp * (cp - 1) for x in kind.cp_sends(cfg) if x.op == CP_SEND_KV)
    return 4 * rep + mixer + mlp, rep


def workspace_values(cfg, tp: int, sp: bool) -> float:
    """Values per token the backward of one block allocates beside what is kept (input
    gradients of the MLP's gate and up projections, the residual stream's): 2 x hidden/tp +
    d_model (/tp under SP), measured (docs/planning.md#activations)."""
    return 2 * cfg.mlp_hidden / tp + (cfg.d_model / tp if sp else cfg.d_model)


def in_flight(pp_rank: int, pp: int, vpp: int, micro_batches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak: 1 without
    pipelining (each is freed by its backward), pp - r in 1F1B's warm-up, and for interleaved
    1F1B megatron's warm-up count of chunk forwards, each holding 1/vpp of the rank's layers."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(micro_batches, pp - pp_rank))
    chunks = min(micro_batches * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)
    return chunks / vpp


def estimate(tc, layout) -> list[RankEstimate]:
    """One RankEstimate per pipeline rank of TrainConfig `tc` on `layout`. Parameters are
    counted on the meta device (no memory), with the same placement and TP rules as the
    checkpoints (megatron_adapters/sharding.py), once per model and TP size."""
    cfg, pcfg = tc.model, layout.parallel
    counts = _param_counts(cfg.model_dump_json(), pcfg.tp)
    stages = layout.stage_layers()
    last = pcfg.num_stages - 1
    dp_cp = layout.dp * pcfg.cp
    micro_batches = tc.micro_batches_per_rank(layout.dp)
    b, s = tc.train.micro_batch_size, tc.train.seq_len // pcfg.cp
    value = FP32 if tc.train.precision == "fp32" else 2
    logits = 2 * b * s * cfg.vocab_size / pcfg.tp * FP32  # fp32 logits and their softmax for the loss
    per_code = {code: layer_values(code, cfg, tc.train.seq_len, pcfg.tp, pcfg.sp, pcfg.cp) for code in set(cfg.layers)}
    workspace = math.ceil(workspace_values(cfg, pcfg.tp, pcfg.sp) * b * s * value)
    out = []
    for r in range(pcfg.pp):
        mine = layout.chunk_stages(r)
        layers = [i for st in mine for i in stages[st]]
        first, is_last = 0 in mine, last in mine
        params = sum(counts.per_layer[i] for i in layers) + counts.outside[first, is_last]
        kinds = Counter(cfg.layers[i] for i in layers)
        full = sum(n * per_code[c][0] for c, n in kinds.items()) * b * s * value
        recompute = (sum(n * per_code[c][1] for c, n in kinds.items())
                     + max((per_code[c][0] for c in kinds), default=0)) * b * s * value
        extra = logits if is_last else 0
        weights, grads, optimizer = state_bytes(params, tc.zero.stage, dp_cp)
        # the data-parallel sum flattens its gradients in buckets (megatron_adapters/grads.py);
        # under ZeRO DeepSpeed reduces them in its own buckets of the partition size
        bucket = min(params, GRAD_BUCKET_NUMEL) * FP32 if dp_cp > 1 and tc.zero.stage == 0 else 0
        out.append(RankEstimate(
            pp_rank=r, params=params, layers=len(layers), weights=weights, grads=grads, optimizer=optimizer,
            activations=math.ceil(full + extra), activations_recompute=math.ceil(recompute + extra),
            in_flight=in_flight(r, pcfg.pp, pcfg.vpp or 1, micro_batches), recompute=tc.train.activation_checkpointing,
            buffers=bucket, workspace=workspace if layers else 0))
    return out
