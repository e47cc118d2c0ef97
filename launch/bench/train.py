"""`hyena-glt bench train`: training throughput, measured side by side in one run.

For each (model size, context length): tokens/s of the striped Hyena model and of an
attention-only model of the same width and depth (pattern of `*`), in one process and in
two processes as data parallel and as tensor parallel. Each case is a real `hyena-glt
train` run (torchrun for two processes) on E. coli windows; the figure is the median
tokens/s over the steps after the first (warm-up).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.args import positive_int

REPO = Path(__file__).resolve().parents[2]
GENOME = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"
SIZES = {
    "tiny": ["model.d_model=64", "model.num_heads=4", "model.num_filter_groups=8"],
    "small": ["model.d_model=256", "model.num_heads=4", "model.num_filter_groups=16"],
}
LAYOUTS = {"1 proc": (1, []), "DP=2": (2, []), "TP=2": (2, ["parallel.tp=2"])}


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--steps", type=positive_int, default=4, help="training steps per case (the first is warm-up)")
    p.add_argument("--global-batch", type=positive_int, default=2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(packed: Path, work: Path, size: str, L: int, pattern: str, layout: str, steps: int, gb: int) -> float:
    nproc, extra = LAYOUTS[layout]
    out = work / f"{size}-{L}-{pattern.count('*')}-{layout.replace(' ', '').replace('=', '')}"
    args = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), f"model.pattern={pattern}", *SIZES[size],
            f"model.max_seq_len={L}", f"train.seq_len={L}", f"train.steps={steps}", f"train.global_batch_size={gb}",
            "train.micro_batch_size=1", "train.eval_batches=0", "train.warmup_steps=1", f"data.train={packed}",
            "checkpoint.dir=null", f"out_dir={out}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.cli", *args]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "launch.cli", *args]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {out.name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def run(args) -> int:
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="hyena-glt-bench-") as tmp:
        work = Path(tmp)
        packed = work / "packed"
        subprocess.run([sys.executable, "-m", "launch.cli", "pack", str(GENOME), "--out", str(packed), "--seq-len",
                        str(max(lengths)), "--val-fraction", "0", "--progress", "none"], check=True, cwd=REPO,
                       capture_output=True)
        print(f"# bench train: {platform.processor() or 'cpu'}, {os.cpu_count()} cores, fp32, global batch "
              f"{args.global_batch} x L tokens, median tokens/s of steps 2..{args.steps}", flush=True)
        print(f"{'size':<6}{'L':>7}  {'layout':<7}{'hyena tok/s':>13}{'attn-only tok/s':>17}{'hyena/attn':>12}")
        for size in args.sizes.split(","):
            for L in lengths:
                for layout in args.layouts.split(","):
                    hy = _case(packed, work, size, L, "SDH*SDH*", layout, args.steps, args.global_batch)
                    at = _case(packed, work, size, L, "********", layout, args.steps, args.global_batch)
                    results.append({"size": size, "L": L, "layout": layout, "hyena_tokens_per_s": hy,
                                    "attention_tokens_per_s": at, "speedup": hy / at})
                    print(f"{size:<6}{L:>7}  {layout:<7}{hy:>13,.0f}{at:>17,.0f}{hy / at:>11.2f}x", flush=True)
    out = {"bench": "train", "cores": os.cpu_count(), "results": results}
    print("\n" + json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
