"""`hyena-glt plan`: rank the layouts of a training config on N devices by predicted speed.

    hyena-glt plan --config configs/cluster_7b.yaml --gpus 256 [--gpus-per-node 8] [--hardware h100]
    hyena-glt calibrate --out cpu.yaml           # this machine's CPU profile (bench ops + a gloo probe)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from launch.args import positive_int

GIB = 2**30


def register(sub) -> None:
    p = sub.add_parser("plan", help="rank the parallel layouts of a config on N devices: memory, step time, MFU",
                       description="Enumerate every valid layout (tp, cp, pp, vpp, ZeRO stage, micro-batch, "
                       "activation checkpointing) of a training config on --gpus devices, predict each one's memory "
                       "per rank and step time from a hardware profile (docs/planning.md), and print the fastest "
                       "that fit, the config's own layout, and why the others were rejected.")
    p.add_argument("--config", help="the training YAML (its model, seq_len and global batch are kept)")
    p.add_argument("--gpus", type=positive_int, help="devices (processes) of the run")
    p.add_argument("--gpus-per-node", type=positive_int, default=None,
                   help="devices per node (default: the profile's devices_per_node)")
    p.add_argument("--hardware", default="h100", help="a profile name (configs/hardware/NAME.yaml) or a YAML path")
    p.add_argument("--top", type=positive_int, default=10, help="layouts shown")
    p.add_argument("--json", metavar="FILE", help="also write every kept layout and the rejections as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
    p.set_defaults(func=_plan)
    from .calibrate import __doc__ as calibrate_doc
    from .calibrate import add_arguments

    c = sub.add_parser("calibrate", help="measure this machine's hardware profile for `plan`: per-kind rates, memory "
                       "bandwidth, gloo link, the trainer's memory", description=calibrate_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(c)
    c.set_defaults(func=_calibrate)


def _calibrate(args) -> int:
    from .calibrate import run

    return run(args)


def _plan(args) -> int:
    from launch.cli import CLIError
    from launch.training.config import TrainConfig

    from .hardware import load_hardware

    if not args.config or not args.gpus:
        raise CLIError("plan: --config and --gpus are required")
    hw = load_hardware(args.hardware)
    if args.gpus_per_node and args.gpus_per_node > hw.devices_per_node and not hw.cores_per_device:
        raise CLIError(f"plan: --gpus-per-node {args.gpus_per_node} is more than the {hw.devices_per_node} devices a "
                       f"node of profile {hw.name} has")
    tc = TrainConfig.load(args.config, args.overrides)
    print(format_plan(args.config, tc, args.gpus, hw, args.gpus_per_node, args.top, args.json))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def _row(rank, c, dp, pr, world) -> str:
    comm = "/".join(f"{pr.comm_s[k]:.2f}" for k in ("tp", "cp", "dp", "pp"))
    return (f"{rank:>4} {c.tp:>3} {c.cp:>3} {c.pp:>3} {c.vpp:>3} {dp:>5} {c.zero:>4} {c.micro_batch:>3} "
            f"{'on' if c.recompute else 'off':>4} {pr.peak_bytes / GIB:>8.1f} {pr.step_s:>8.2f} "
            f"{pr.tokens_per_s / world:>10,.0f} {100 * pr.mfu:>5.1f}% {pr.compute_s:>8.2f} {pr.bubble_s:>7.2f} "
            f"{comm:>22}  {pr.bound}")


HEADER = (f"{'rank':>4} {'tp':>3} {'cp':>3} {'pp':>3} {'vpp':>3} {'dp':>5} {'zero':>4} {'mb':>3} {'rc':>4} "
          f"{'mem GiB':>8} {'step s':>8} {'tok/s/dev':>10} {'MFU':>6} {'compute':>8} {'bubble':>7} "
          f"{'comm s tp/cp/dp/pp':>22}  bound by")


def format_plan(config_path, tc, world: int, hw, per_node, top: int, json_path: str | None = None) -> str:
    from .cost import undeclared_cp_kinds
    from .memory import model_params
    from .search import Candidate, plan, rejection_summary

    t0 = time.perf_counter()
    kept, rejected = plan(tc, world, hw, per_node)
    seconds = time.perf_counter() - t0
    t, p = tc.train, tc.parallel
    node = min(world, per_node or hw.devices_per_node)
    lines = [f"# plan: {config_path} on {world:,} x {hw.name} ({node} per node): {hw.description}",
             f"# model: {_count(model_params(tc.model))} parameters, pattern {tc.model.pattern!r}, d_model {tc.model.d_model}; seq_len {t.seq_len:,}, global batch "
             f"{t.global_batch_size} ({t.global_batch_size * t.seq_len:,} tokens), {t.precision}",
             f"# {len(kept) + len(rejected):,} layouts tried in {seconds:.1f} s: {len(kept):,} fit, "
             f"{len(rejected):,} rejected; model: docs/planning.md (no overlap of communication with compute)"]
    missing = undeclared_cp_kinds(tc.model)
    if missing:
        lines.append(f"# note: layer kind(s) {', '.join(missing)} declare no cp_sends: their CP traffic is not counted")
    lines += ["", HEADER]
    for i, pl in enumerate(kept[:top], 1):
        lines.append(_row(i, pl.candidate, pl.dp, pl.prediction, world))
    own = Candidate(p.tp, p.cp, p.pp, p.vpp, tc.zero.stage, t.micro_batch_size, t.activation_checkpointing)
    mine = next((i for i, pl in enumerate(kept, 1) if pl.candidate == own), None)
    lines.append("")
    if mine is not None:
        pl = kept[mine - 1]
        lines += ["# the config's own layout:", _row(mine, pl.candidate, pl.dp, pl.prediction, world)]
        if p.sp != own.sp:
            lines.append(f"#   (the planner runs it with sp={'on' if own.sp else 'off'}; the config says "
                         f"sp={'on' if p.sp else 'off'})")
    else:
        why = next((w for c, w in rejected if c == own), "not among the candidates")
        lines.append(f"# the config's own layout ({own.describe()}) is rejected: {why}")
    if kept:
        best = kept[0]
        lines.append(f"# to train the best: hyena-glt train --config {config_path} {' '.join(best.candidate.overrides())}")
    lines += ["", "# rejected, by reason (count: reason; an example):"]
    for n, kind, example in rejection_summary(rejected):
        lines.append(f"{n:>7,}: {kind}\n         e.g. {example}")
    if json_path:
        out = {"config": str(config_path), "world": world, "hardware": hw.model_dump(), "seconds": seconds,
               "kept": [{**vars(pl.candidate), "dp": pl.dp, "peak_bytes": pl.prediction.peak_bytes,
                         "step_s": pl.prediction.step_s, "tokens_per_s": pl.prediction.tokens_per_s,
                         "mfu": pl.prediction.mfu, "compute_s": pl.prediction.compute_s,
                         "bubble_s": pl.prediction.bubble_s, "comm_s": pl.prediction.comm_s,
                         "optimizer_s": pl.prediction.optimizer_s, "links": pl.prediction.links} for pl in kept],
               "rejected": [{**vars(c), "reason": w} for c, w in rejected]}
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    return "\n".join(lines)
