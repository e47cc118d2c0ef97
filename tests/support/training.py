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
REL = 1e-5  # per-step losses (float summation order differs between layouts)
# Gradient norms: the same relative tolerance as the losses would do (measured: <= 3e-6); a
# little margin since a norm sums squares over every parameter. A DP average doubled (or lost)
# moves every norm by 2x, which AdamW hides from the losses and the weights.
GRAD_NORM_REL = 1e-4
# Final weights, element-wise: measured max |diff| <= 2.4e-6 over every layout here (4 steps);
# one Adam step is ~lr = 3e-3, so an update gone another way (a parameter a layout does not
# train, a sign flip on a near-zero gradient) shows as ~1e-3.
WEIGHT_ATOL = 2e-5


def cli_command() -> list[str]:
    return [sys.executable, "-m", "launch.cli"]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train_argv(packs: Path, out: Path, *overrides: str) -> list[str]:
    """`hyena-glt train` arguments of the tiny run (STEPS steps, seq 128, global batch 8)."""
    return ["train", "--config", str(CONFIG), f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_batches=2", f"data.train={packs / 'train'}",
            f"data.val={packs / 'val'}", f"out_dir={out}", f"checkpoint.dir={out / 'ckpt'}", *overrides]


def torchrun_command(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra,
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]


def train(packs: Path, out: Path, nproc: int, *overrides: str, launcher: str = "torchrun", extra: list[str] = (),
          check: bool = True, wait: bool = True):
    args = train_argv(packs, out, *overrides)
    if launcher == "torchrun":
        cmd = [*torchrun_command(nproc, *extra), "-m", "launch.cli", *args]
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


class SharedRuns:
    """From-scratch runs that several tests read, each trained once per test session module:
    every run of one world size goes into one launch (tests/support/train_many.py), started
    the first time a test asks for one of them. `table`: name -> (processes, overrides).
    Tests read a run's directory; one that resumes or changes a run copies it first."""

    def __init__(self, packs: Path, root: Path, table: dict[str, tuple[int, list[str]]]):
        self.packs, self.root, self.table = packs, root, table
        self.done: dict[str, Path] = {}
        self.failures: dict[int, str] = {}

    def __call__(self, name: str) -> Path:
        nproc = self.table[name][0]
        if name not in self.done and nproc not in self.failures:
            self._launch(nproc)
        assert name in self.done, f"run {name} did not finish: {self.failures.get(nproc, '')}"
        return self.done[name]

    def _launch(self, nproc: int) -> None:
        names = [n for n, (k, _) in self.table.items() if k == nproc and n not in self.done]
        runs = [{"id": n, "argv": train_argv(self.packs, self.root / n, *self.table[n][1])} for n in names]
        spec = self.root / f"runs-{nproc}.json"
        spec.write_text(json.dumps(runs))
        script = str(REPO / "tests" / "support" / "train_many.py")
        cmd = [sys.executable, script, str(spec)] if nproc == 1 else [*torchrun_command(nproc), script, str(spec)]
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240 * len(runs))
        for line in proc.stdout.splitlines():
            if line.startswith("RUN ") and line.split()[2] == "0":
                self.done[line.split()[1]] = self.root / line.split()[1]
        if proc.returncode != 0:
            self.failures[nproc] = f"{' '.join(cmd)} exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-5000:]}"


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


def grad_norms(out: Path) -> list[float]:
    return [r["grad_norm"] for r in metrics(out) if "loss" in r]


def final_weights(out: Path) -> dict:
    """The single-device weights of a run's newest checkpoint (TP slices joined, stages merged)."""
    from launch.checkpoint import full_model_state, latest_checkpoint

    return full_model_state(latest_checkpoint(out / "ckpt"))


def weight_differences(a: dict, b: dict) -> dict[str, float]:
    """Per tensor: max |a - b|."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a}


def assert_same_training(run: Path, reference: Path, rel: float = REL) -> None:
    """A layout trains as one process: per-step losses within `rel`, per-step gradient norms
    within GRAD_NORM_REL, final weights within WEIGHT_ATOL."""
    assert_close(losses(run), losses(reference), rel)
    assert_close(grad_norms(run), grad_norms(reference), GRAD_NORM_REL)
    diffs = weight_differences(final_weights(run), final_weights(reference))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WEIGHT_ATOL, f"final weights differ: {worst}: max |diff| {diffs[worst]:.3e}"
