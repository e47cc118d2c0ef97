"""`hyena-glt bench plan`: the planner's predictions beside measured training runs.

For each layout (1, 2 and 4 ranks: DP, TP, CP, PP, ZeRO, activation checkpointing) of a small
config, real training steps run (the trainer itself, `Trainer.train`, in one process per
rank; gloo on CPU) and are compared with `hyena-glt plan`'s model for the same layout on a
profile of this machine (`--hardware FILE`, or calibrated first by `hyena-glt calibrate`):

* memory: each rank's peak resident set (VmHWM, reset then) minus its resident set just before the
  trainer is built (every library already imported), against the rank's predicted total
  (weights, gradients, optimizer, activations of the micro-batches in flight, buffers). glibc
  serves allocations >= 64 KiB by mmap here (launch/plan/measure.py), so freed tensors leave
  the resident set as they do a GPU allocator's live bytes.
* bytes: what each rank handed to context-parallel collectives per step (the counters of
  megatron_adapters/context_parallel.py) against `cost.cp_bytes` (exactly equal).
* step time: the median of the steps after the first of a second run of the layout, without
  the allocator settings of the memory run (they cost time), against the predicted step time;
  and whether the predictions rank the layouts in the measured order.

Every rank runs one thread (a CPU device is one core: `cores_per_device` 1); four ranks on a
two-core machine share the cores, which the model knows (ranks per node > devices per node).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch.plan.measure import BASE, CONFIG, measure, pack

# name -> (ranks, overrides)
LAYOUTS = {
    "1 rank": (1, []),
    "1 rank recompute": (1, ["train.activation_checkpointing=true"]),
    "DP=2": (2, []),
    "DP=2 ZeRO-2": (2, ["zero.stage=2"]),
    "TP=2 SP": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "CP=2": (2, ["parallel.cp=2"]),
    "PP=2": (2, ["parallel.pp=2"]),
    "TP=2 x DP=2": (4, ["parallel.tp=2", "parallel.sp=true"]),
    "CP=2 x PP=2": (4, ["parallel.cp=2", "parallel.pp=2"]),
}


def add_arguments(p) -> None:
    from launch.args import positive_int

    p.add_argument("--hardware", default=None, help="profile of this machine (default: `hyena-glt calibrate` it first)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    p.add_argument("--steps", type=positive_int, default=4, help="training steps per layout (the first is warm-up)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every layout (e.g. train.seq_len=1024)")


def compare(tc, world: int, hw, measured: dict) -> dict:
    """Predicted beside measured for one layout."""
    from launch.plan.cost import cp_bytes, predict

    layout = tc.layout_for(world)
    pr = predict(tc, layout, hw, per_node=world)
    runtime = hw.runtime_gib * 2**30
    p, t = tc.parallel, tc.train
    value = 4 if t.precision == "fp32" else 2
    ranks = []
    for r in measured["ranks"]:
        est = pr.ranks[r["pp"]]
        stage = layout.stage_layers()
        codes = "".join(tc.model.layers[i] for st in layout.chunk_stages(r["pp"]) for i in stage[st])
        m = tc.micro_batches_per_rank(layout.dp)
        want = {k: v * m for k, v in cp_bytes(tc.model, t.seq_len, t.micro_batch_size, p.cp, p.tp, r["cp"], value,
                                                p.cp_long_conv, t.activation_checkpointing, codes=codes).items()}
        got = {k: round(v) for k, v in r["traffic"].items()}
        ranks.append({"rank": r["rank"], "pp": r["pp"], "predicted_bytes": est.total + runtime,
                      "measured_bytes": r["peak"] - r["baseline"], "cp_bytes_predicted": want, "cp_bytes_counted": got})
    steps = measured["step_seconds"][1:] or measured["step_seconds"]
    return {"world": world, "predicted_step_s": pr.step_s, "measured_step_s": statistics.median(steps),
            "step_seconds": measured["step_seconds"], "ranks": ranks, "bound": pr.bound,
            "compute_s": pr.compute_s, "comm_s": pr.comm_s, "bubble_s": pr.bubble_s, "optimizer_s": pr.optimizer_s}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return 1.0
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def run(args) -> int:
    import argparse

    from launch.plan.hardware import load_hardware
    from launch.training.config import TrainConfig

    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        print(f"hyena-glt bench plan: unknown layout(s) {unknown}; known: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    config = str(CONFIG)
    results = []
    with tempfile.TemporaryDirectory(prefix="hyena-glt-bench-plan-") as tmp:
        work = Path(tmp)
        base = [*BASE, *args.set, f"train.steps={args.steps}"]
        seq_len = TrainConfig.load(config, base + ["data.train=x"]).train.seq_len
        data = pack(work, seq_len)
        base += [f"data.train={data}", f"data.val={data}"]
        tc0 = TrainConfig.load(config, base)
        if args.hardware:
            hw_path = args.hardware
        else:
            from launch.plan.calibrate import run as calibrate

            hw_path = str(work / "cpu.yaml")
            calibrate(argparse.Namespace(out=hw_path, d_model=tc0.model.d_model, seq_len=seq_len, cores_per_device=1,
                                         micro_batch=tc0.train.micro_batch_size, repeats=3))
        hw = load_hardware(hw_path)
        print(f"# bench plan: {hw.description}; model d_model {tc0.model.d_model}, pattern {tc0.model.pattern!r}, "
              f"seq_len {seq_len}, global batch {tc0.train.global_batch_size}, micro-batch "
              f"{tc0.train.micro_batch_size}, fp32, {args.steps} steps (the first is warm-up); load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(f"{'layout':<22}{'ranks':>6}{'pred MiB':>10}{'meas MiB':>10}{'mem err':>9}{'pred s':>9}{'meas s':>9}"
              f"{'time err':>10}{'CP bytes':>10}  bound", flush=True)
        for name in names:
            world, extra = LAYOUTS[name]
            tc = TrainConfig.load(config, [*base, *extra])
            t0 = time.perf_counter()
            work_dir = work / name.replace(" ", "_").replace("=", "")
            timed = measure(config, [*base, *extra], world, work_dir / "timed", memory=False)
            measured = measure(config, [*base, *extra, "train.steps=2"], world, work_dir / "memory")
            measured["step_seconds"] = timed["step_seconds"]
            row = {"layout": name, "wall_s": time.perf_counter() - t0, **compare(tc, world, hw, measured)}
            results.append(row)
            worst = max(row["ranks"], key=lambda r: abs(r["measured_bytes"] / r["predicted_bytes"] - 1))
            cp_ok = all(r["cp_bytes_predicted"] == r["cp_bytes_counted"] for r in row["ranks"])
            err_t = row["predicted_step_s"] / row["measured_step_s"] - 1
            print(f"{name:<22}{world:>6}{worst['predicted_bytes'] / 2**20:>10.0f}{worst['measured_bytes'] / 2**20:>10.0f}"
                  f"{100 * (worst['predicted_bytes'] / worst['measured_bytes'] - 1):>+8.0f}%"
                  f"{row['predicted_step_s']:>9.2f}{row['measured_step_s']:>9.2f}{100 * err_t:>+9.0f}%"
                  f"{('equal' if cp_ok else 'DIFFER'):>10}  {row['bound']}", flush=True)
    pred = [r["predicted_step_s"] for r in results]
    meas = [r["measured_step_s"] for r in results]
    rho = spearman(pred, meas)
    order_pred = [r["layout"] for r in sorted(results, key=lambda r: r["predicted_step_s"])]
    order_meas = [r["layout"] for r in sorted(results, key=lambda r: r["measured_step_s"])]
    print(f"\n# fastest first, predicted: {' < '.join(order_pred)}\n# fastest first, measured:  {' < '.join(order_meas)}"
          f"\n# rank correlation (Spearman) {rho:.2f}; load average at the end {os.getloadavg()[0]:.1f}")
    print(json.dumps({"hardware": hw.model_dump(), "rows": results, "spearman": rho}, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw.model_dump(), "rows": results, "spearman": rho},
                                              indent=1, default=str) + "\n")
    return 0
