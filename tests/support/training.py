"""The trainer tests' helpers: the tiny run every layout is compared on, its launchers
(one process, torchrun, the deepspeed launcher) and its per-step metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
STEPS = 4
REL = 1e-5


def cli_command() -> list[str]:
    return [sys.executable, "-m", "launch.cli"]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train(packs: Path, out: Path, nproc: int, *overrides: str, launcher: str = "torchrun", extra: list[str] = (),
          check: bool = True, wait: bool = True):
    args = ["train", "--config", str(CONFIG), f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_batches=2", f"data.train={packs / 'train'}",
            f"data.val={packs / 'val'}", f"out_dir={out}", f"checkpoint.dir={out / 'ckpt'}", *overrides]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra,
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "launch.cli", *args]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "launch.cli", *args]
    else:
        cmd = [*cli_command(), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(out: Path) -> list[float]:
    rows = [r for r in metrics(out) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(steps[0], steps[0] + len(rows))), steps  # consecutive, none repeated
    return [r["loss"] for r in rows]


def assert_close(a: list[float], b: list[float], rel: float = REL) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), f"{a} vs {b}"
