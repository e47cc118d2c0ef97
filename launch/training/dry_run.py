"""`hyena-glt train --dry-run --world-size N --config FILE`: check a training config for a
world size and estimate each rank's memory, without starting processes or building groups.

The rules are the trainer's own (TrainConfig.layout_for: the config checks, check_layout's
layout rules, the batch split), so a config this accepts passes the same checks at the start
of a real run. The packs and directories are not looked at (check_start does that when the
run starts, on the machines that have them).

Memory is an estimate from formulas, the planner's own (launch/plan/memory.py; docs/planning.md
states them beside measured peaks): fp32 weights, gradients and Adam states per ZeRO stage,
activations per micro-batch with and without activation checkpointing, and the step's
communication buffers, for each pipeline rank (TP ranks of one stage hold the same amounts).
`hyena-glt plan` asks the same model of every layout and adds the step time.
"""

from __future__ import annotations

from launch.plan.memory import MIB, estimate
from launch.training.config import TrainConfig


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
        "estimated memory per rank in MiB (formulas: docs/training.md#memory-estimate, docs/planning.md):",
        f"{'pp rank':>7} {'layers':>6} {'params':>14} {'weights':>10} {'grads':>10} {'optimizer':>10} "
        f"{'act/mb':>10} {'act/mb rc':>10} {'in flight':>9} {'buffers':>10} {'total':>10}",
    ]
    for e in ranks:
        lines.append(f"{e.pp_rank:>7} {e.layers:>6} {e.params:>14,} {mib(e.weights):>10} {mib(e.grads):>10} "
                     f"{mib(e.optimizer):>10} {mib(e.activations):>10} {mib(e.activations_recompute):>10} "
                     f"{e.in_flight:>9g} {mib(e.buffers):>10} {mib(e.total):>10}")
    top = max(ranks, key=lambda e: e.total)
    lines.append(f"largest: pp rank {top.pp_rank}, {mib(top.total)} MiB ({mib(top.states)} weights + grads + "
                 f"optimizer, {mib(top.activation_peak)} activations)")
    return "\n".join(lines)


def run_dry_run(config_path: str, overrides: list[str], world_size: int) -> int:
    tc = TrainConfig.load(config_path, overrides)
    layout = tc.layout_for(world_size)
    print(report(config_path, tc, layout))
    return 0
