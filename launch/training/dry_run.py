"""`hyena-glt train --dry-run --world-size N --config FILE`: check a training config for a
world size and estimate each rank's memory, without starting processes or building groups.

The rules are the trainer's own (TrainConfig.layout_for: the config checks, check_layout's
layout rules, the batch split), so a config this accepts passes the same checks at the start
of a real run. The packs and directories are not looked at (check_start does that when the
run starts, on the machines that have them).

Memory is an estimate from formulas (docs/training.md states them): fp32 weights, gradients
and Adam states per ZeRO stage, and activations per micro-batch with and without activation
checkpointing, for each pipeline rank (TP ranks of one stage hold the same amounts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hyena_glt.kinds import layer_kind
from launch.training.config import TrainConfig

MIB = 2**20
FP32 = 4


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

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def activation_peak(self) -> int:
        per_mb = self.activations_recompute if self.recompute else self.activations
        return math.ceil(per_mb * self.in_flight)

    @property
    def total(self) -> int:
        return self.states + self.activation_peak


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


def _layer_values(code: str, cfg, tc: TrainConfig) -> tuple[float, float]:
    """(values kept per token for backward, of them the block input) for one block on one
    rank: norms and residuals 4 x d_model (/tp under SP), the MLP 4 x hidden/tp, and the
    mixer what its layer kind declares (`LayerKind.activations`, hyena_glt/kinds.py; the
    Hyena kinds 10 x d_model/tp, attention 5 x d_model/tp plus heads/tp x seq_len)."""
    tp = tc.parallel.tp
    rep = cfg.d_model / tp if tc.parallel.sp else cfg.d_model
    mlp = 4 * cfg.mlp_hidden / tp
    mixer = layer_kind(code).activations(cfg, tc.train.seq_len, tp)
    return 4 * rep + mixer + mlp, rep


def _in_flight(pp_rank: int, tc: TrainConfig, micro_batches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak: 1 without
    pipelining (each is freed by its backward), pp - r in 1F1B's warm-up, and for interleaved
    1F1B megatron's warm-up count of chunk forwards, each holding 1/vpp of the rank's layers."""
    pp, vpp = tc.parallel.pp, tc.parallel.vpp
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(micro_batches, pp - pp_rank))
    chunks = min(micro_batches * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)
    return chunks / vpp


def estimate(tc: TrainConfig, layout) -> list[RankEstimate]:
    """One RankEstimate per pipeline rank. Parameters are counted on the meta device (no
    memory), with the same placement and TP rules as the checkpoints (sharding.py)."""
    from megatron_adapters.sharding import canonical_params, held_by_stage, tp_split_dim

    cfg, pcfg = tc.model, layout.parallel
    template = canonical_params(cfg)
    stages = layout.stage_layers()
    last = pcfg.num_stages - 1
    dp_cp = layout.dp * pcfg.cp
    micro_batches = tc.micro_batches_per_rank(layout.dp)
    b, s = tc.train.micro_batch_size, tc.train.seq_len // pcfg.cp
    value = FP32 if tc.train.precision == "fp32" else 2
    logits = 2 * b * s * cfg.vocab_size / pcfg.tp * FP32  # fp32 logits and their softmax for the loss
    out = []
    for r in range(pcfg.pp):
        mine = layout.chunk_stages(r)
        params = 0
        for name, t in template.items():
            if any(held_by_stage(name, set(stages[st]), first=st == 0, last=st == last, tied=cfg.tie_embeddings)
                   for st in mine):
                params += t.numel() // (pcfg.tp if tp_split_dim(name) is not None else 1)
        layers = [i for st in mine for i in stages[st]]
        per_layer = [_layer_values(cfg.layers[i], cfg, tc) for i in layers]
        full = sum(v for v, _ in per_layer) * b * s * value
        recompute = (sum(x for _, x in per_layer) + max((v for v, _ in per_layer), default=0)) * b * s * value
        extra = logits if last in mine else 0
        weights, grads, optimizer = state_bytes(params, tc.zero.stage, dp_cp)
        out.append(RankEstimate(
            pp_rank=r, params=params, layers=len(layers), weights=weights, grads=grads, optimizer=optimizer,
            activations=math.ceil(full + extra), activations_recompute=math.ceil(recompute + extra),
            in_flight=_in_flight(r, tc, micro_batches), recompute=tc.train.activation_checkpointing))
    return out


def report(config_path: str, tc: TrainConfig, layout) -> str:
    p, t = layout.parallel, tc.train
    micro = tc.micro_batches_per_rank(layout.dp)
    ranks = estimate(tc, layout)
    zero = (f"ZeRO-{tc.zero.stage} partitions over dp x cp = {layout.dp * p.cp}" if tc.zero.stage
            else "no ZeRO (zero.stage=0)")
    mib = lambda n: f"{n / MIB:,.1f}"  # noqa: E731
    lines = [
        f"{config_path}: valid for world size {layout.world_size}",
        f"layout: {p.describe(layout.world_size)}; {zero}",
        f"batch: global {t.global_batch_size} = dp {layout.dp} x {micro} micro-batches x {t.micro_batch_size} "
        f"sequences of {t.seq_len} bytes; activation checkpointing {'on' if t.activation_checkpointing else 'off'}",
        "estimated memory per rank in MiB (formulas: docs/training.md#memory-estimate):",
        f"{'pp rank':>7} {'layers':>6} {'params':>14} {'weights':>10} {'grads':>10} {'optimizer':>10} "
        f"{'act/mb':>10} {'act/mb rc':>10} {'in flight':>9} {'total':>10}",
    ]
    for e in ranks:
        lines.append(f"{e.pp_rank:>7} {e.layers:>6} {e.params:>14,} {mib(e.weights):>10} {mib(e.grads):>10} "
                     f"{mib(e.optimizer):>10} {mib(e.activations):>10} {mib(e.activations_recompute):>10} "
                     f"{e.in_flight:>9g} {mib(e.total):>10}")
    top = max(ranks, key=lambda e: e.total)
    lines.append(f"largest: pp rank {top.pp_rank}, {mib(top.total)} MiB ({mib(top.states)} weights + grads + "
                 f"optimizer, {mib(top.activation_peak)} activations)")
    return "\n".join(lines)


def run_dry_run(config_path: str, overrides: list[str], world_size: int) -> int:
    tc = TrainConfig.load(config_path, overrides)
    layout = tc.layout_for(world_size)
    print(report(config_path, tc, layout))
    return 0
