"""Training steps measured for the planner: one process per rank running the trainer itself
(`Trainer.train`, gloo on CPU), each rank's peak resident set (VmHWM, reset just before the
trainer is built) over its resident set then, the bytes it handed to context-parallel collectives, and rank 0's step times.
`hyena-glt calibrate` measures the trainer's own memory beside the model with it, `bench plan`
every layout of its table (docs/planning.md).

For memory, allocations >= 64 KiB are served by mmap and the heap is trimmed at 64 KiB
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so freed tensors leave the resident set as
they leave a GPU allocator's live bytes; that costs time, so timed runs go without it. Every
rank runs one thread: a CPU device is a core.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENOME = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"
CONFIG = REPO / "configs" / "tiny.yaml"
# the small config of the measured runs: activations and states well above the process's noise
BASE = ["model.pattern=SDH*SDH*", "model.d_model=256", "model.num_heads=4", "model.num_filter_groups=16",
        "model.max_seq_len=2048", "train.seq_len=2048", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.eval_batches=0", "train.warmup_steps=1", "train.log_every=1000", "train.peer_timeout_s=0",
        "checkpoint.dir=null"]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 16), "OMP_NUM_THREADS": "1"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) * 1024


def _start_peak() -> int:
    """This process's resident set now, and its peak (VmHWM) reset to it (Linux clear_refs 5),
    so a transient of the imports before is not taken for the run's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


# torch.profiler's names of the tensor collectives megatron-core's parallel layers call, and
# which of their inputs is the whole tensor (the planner's bytes: launch/plan/cost.py)
PROFILED_COLLECTIVES = {"c10d::_allgather_base_": ("all_gather", 0), "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
                        "c10d::allreduce_": ("all_reduce", None)}


def _collectives(events) -> dict[str, int]:
    """'<collective> <bytes of the whole tensor>' -> calls, from a profile's events; an
    all-reduce's tensor list has no recorded shape: '<all_reduce> ?'."""
    import math

    import torch

    counts: dict[str, int] = {}
    for e in events:
        if e.name not in PROFILED_COLLECTIVES:
            continue
        op, which = PROFILED_COLLECTIVES[e.name]
        size = "?"
        if which is not None:
            dtype = getattr(torch, e.input_dtypes[which].split(" ")[-1], None) if e.input_dtypes else None
            size = math.prod(e.input_shapes[which]) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)
        key = f"{op} {size}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _worker(rank: int, world: int, port: int, config: str, overrides: list[str], out: str,
            collectives: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # library deprecations, once per rank: not this table's business

    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (imported before the baseline: its code is not the run's memory)

    from launch.cli import _quiet_third_party_warnings
    from launch.training.config import TrainConfig
    from launch.training.trainer import Trainer
    from megatron_adapters import context_parallel as cpar
    from megatron_adapters.groups import destroy_parallel

    _quiet_third_party_warnings()
    cfg = TrainConfig.load(config, overrides)
    base = _start_peak()
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    cpar.traffic.clear()
    if collectives:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.train()
    else:
        trainer.train()
    peak = _status_bytes("VmHWM")
    coords = trainer.ctx.coords
    record = {"rank": rank, "tp": coords.tp, "cp": coords.cp, "dp": coords.dp, "pp": coords.pp, "baseline": base,
              "peak": peak, "traffic": {k: v / cfg.train.steps for k, v in cpar.traffic.items()}}
    if collectives:
        record["collectives"] = {k: v / cfg.train.steps for k, v in _collectives(prof.events()).items()}
    trainer.close()
    destroy_parallel()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def measure(config: str, overrides: list[str], world: int, work: Path, memory: bool = True,
            collectives: bool = False) -> dict:
    """Run the layout: per-rank records and rank 0's step times. `memory`: with the allocator
    settings that make the resident set follow live tensors (MALLOC); they cost time (every
    allocation >= 64 KiB is its own mmap), so a timed run goes without them. `collectives`:
    each rank's tensor collectives per step, under torch.profiler (which costs time and memory:
    a run of its own)."""
    import torch.multiprocessing as mp

    from launch.net import free_port

    out = work / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    env = MALLOC if memory else {"OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in MALLOC}
    for k in MALLOC:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        mp.spawn(_worker, args=(world, free_port(), config, [*overrides, f"out_dir={work}"], str(out), collectives),
                 nprocs=world, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    steps = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    seconds = [s["tokens"] / s["tokens_per_s"] if i == 0 else (s["tokens"] - steps[i - 1]["tokens"]) / s["tokens_per_s"]
               for i, s in enumerate(steps)]
    return {"ranks": ranks, "step_seconds": seconds, "losses": [s["loss"] for s in steps]}


def runtime_bytes(overrides: list[str], work: Path) -> tuple[int, int]:
    """The trainer's own memory beside the tensors the memory model counts (a hardware profile's
    `runtime_gib`): a 1-rank run of CONFIG with `overrides`, its peak over its baseline less the
    model's total. Returns (runtime, the model's total): libraries' buffers differ by CPU (BLAS
    packing, gloo), so it is measured on the machine, never assumed."""
    from launch.training.config import TrainConfig

    from .memory import estimate

    r = measure(str(CONFIG), overrides, 1, work)["ranks"][0]
    tc = TrainConfig.load(CONFIG, overrides)
    total = estimate(tc, tc.layout_for(1))[0].total
    return r["peak"] - r["baseline"] - total, total


def pack(work: Path, seq_len: int) -> Path:
    import subprocess

    out = work / "packed"
    subprocess.run([sys.executable, "-m", "launch.cli", "pack", str(GENOME), "--out", str(out), "--seq-len",
                    str(seq_len), "--val-fraction", "0", "--progress", "none"], check=True, cwd=REPO,
                   capture_output=True, text=True)
    return out


