"""`hyena-glt demo` (what `make demo` runs): the whole pipeline on the bundled E. coli genome.

    pack      E. coli K-12 -> WebDataset shards for training; a different E. coli (a
              metagenomic contig, its N-masked half dropped by --max-n-fraction) held out
    train     a tiny striped-Hyena model, 2 processes under torchrun (a real parallel layout:
              context parallel x 2 with DeepSpeed ZeRO-1 over the DP x CP group)
    convert   the distributed checkpoint -> one single-device model directory
    eval      bits per base on the held-out windows
    report    a summary table and a loss-curve PNG
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch.net import free_port

REPO = Path(__file__).resolve().parents[2]  # launch/training/demo.py -> the repository
GENOME = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"
HELD_OUT = REPO / "data" / "genomes" / "ecoli_contig_nmasked.fasta.gz"
CONFIG = REPO / "configs" / "tiny.yaml"


def _run(cmd: list[str], title: str, env: dict | None = None) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"demo step '{title}' failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


def loss_curve_png(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"] / 0.6931471805599453) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bits_per_base"]) for r in rows if "val_bits_per_base" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (held-out E. coli contig)")
    ax.axhline(2.0, color="grey", ls="--", lw=0.8, label="2 bits = knowing nothing")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per base")
    ax.set_ylim(1.8, min(8.5, max(b for _, b in train) + 0.2))
    ax.set_title("Hyena-GLT tiny on E. coli K-12")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def run_demo(out: str = "runs/demo", steps: int | None = None, nproc: int = 2,
             eval_windows: int | None = None) -> int:
    out_dir = Path(out).resolve()
    packed, held_out = out_dir / "packed", out_dir / "packed_heldout"
    ckpt, model_dir = out_dir / "checkpoints", out_dir / "model"
    # The demo trains from scratch every time: its own previous checkpoints go first (the
    # trainer refuses resume=false into a dir that holds checkpoints, to protect real runs).
    shutil.rmtree(ckpt, ignore_errors=True)
    exe = [sys.executable, "-m", "launch.cli"]
    times = {}
    times["pack"] = _run(
        [*exe, "pack", str(GENOME), "--out", str(packed), "--seq-len", "512", "--val-fraction", "0"],
        "1/4 pack E. coli K-12 (training) into WebDataset shards",
    )
    times["pack"] += _run(
        [*exe, "pack", str(HELD_OUT), "--out", str(held_out), "--seq-len", "512", "--val-fraction", "1",
         "--max-n-fraction", "0.01"],
        "1/4 pack a held-out E. coli contig (validation); N-masked windows are dropped and reported",
    )
    overrides = [f"data.train={packed}", f"data.val={held_out}", f"checkpoint.dir={ckpt}", f"out_dir={out_dir}",
                 "parallel.cp=2", "zero.stage=1", "checkpoint.resume=false"]
    if steps:
        overrides.append(f"train.steps={steps}")
    times["train"] = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "launch.cli", "train", "--config", str(CONFIG),
         *overrides],
        f"2/4 train a tiny model with {nproc} processes (context parallel x 2, DeepSpeed ZeRO-1)",
        env={"OMP_NUM_THREADS": "1"},
    )
    times["convert"] = _run([*exe, "convert", str(ckpt), str(model_dir), "--verify", "--replace"],  # a rerun replaces it
                            "3/4 convert the distributed checkpoint to one single-device model (and verify logits)")
    print("\n=== 4/4 evaluate on the held-out windows", flush=True)
    # One thread: small models gain little from two, and lose a lot when the cores are busy.
    limit = ["--max-windows", str(eval_windows)] if eval_windows else []
    proc = subprocess.run([*exe, "eval", "--model", str(model_dir), "--data", str(held_out), "--split", "val", *limit],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise RuntimeError("demo step 'eval' failed")
    ev = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    tok_s = sum(r["tokens_per_s"] for r in train_rows[1:]) / max(1, len(train_rows) - 1)
    loss_curve_png(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
    first, last = train_rows[0], train_rows[-1]
    print("\n| | |\n|---|---|")
    for k, v in [
        ("layout", f"{nproc} processes, context parallel x2, ZeRO-1"),
        ("steps", last["step"]),
        ("tokens", f"{last['tokens']:,}"),
        ("train loss (bits/base), first -> last", f"{first['loss'] / 0.693147:.3f} -> {last['loss'] / 0.693147:.3f}"),
        ("mean tokens/s", f"{tok_s:,.0f}"),
        ("held-out bases", f"{ev['bases']:,}"),
        ("held-out bits/base (converted model)", f"{ev['bits_per_base']:.4f}"),
        ("wall time pack / train / convert (s)", f"{times['pack']:.0f} / {times['train']:.0f} / {times['convert']:.0f}"),
        ("loss curve", str(out_dir / "loss_curve.png")),
    ]:
        print(f"| {k} | {v} |")
    (out_dir / "summary.json").write_text(json.dumps({"eval": ev, "steps": last["step"], "tokens_per_s": tok_s,
                                                      "times": times}, indent=2) + "\n")
    return 0
