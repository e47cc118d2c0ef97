"""Checkpoints hold no pickle: a pickle planted in place of any checkpoint file is never run.

Fine-tuning (`hyena-glt finetune --resume`) and pretraining (launch.checkpoint.load_checkpoint,
what `hyena-glt train` resumes through) are each given a checkpoint in which one file at a
time is replaced by a pickle whose unpickling would create a marker file. Resuming must
refuse with a one-line ValueError naming the file, or ignore a file it does not read (the
old `rng-rank*.pt` / `state.pt` names); the marker must never appear. Plus: the RNG state
round-trips through safetensors. (That the fine-tuning modules import each other as a DAG
is tests/test_import_graph.py's.)

Checkpoints you can trust: a locked checkpoint.dir, pruning by step number, verified
checkpoints with fallback, clean failures, start-up validation, and kill + resume.

`hyena-glt train` runs the tiny config for 4 steps (one process, CPU) on packed E. coli
(training) and phage lambda (validation), as tests/training/test_train.py does. Most cases start
from a copy of one base checkpoint dir (steps 1 and 2 saved, `latest` -> step 2), damage it
one way, run one command and check: the exit code, one line naming the problem (never a
traceback), and that no case exits 0 having lost or changed work: the losses of a resumed
run equal the uninterrupted run's bit for bit, metrics.jsonl has one line per step, and a
refused run leaves the checkpoint dir exactly as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import run_cli
from support import slow_saves_env
from support.training import CONFIG, STEPS, metrics, train_argv

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM

REPO = Path(__file__).resolve().parents[2]


def tiny(**kw) -> HyenaGLTConfig:
    return HyenaGLTConfig(**{**dict(pattern="SS", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=512), **kw})


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def malicious_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when loaded; checked to work, so the tests can fail."""
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data)
    assert marker.exists(), "the payload does not run: the test would prove nothing"
    marker.unlink()
    return data


@contextlib.contextmanager
def planted(folder: Path, name: str, data: bytes):
    """`folder/name` replaced by `data` for the duration (restored afterwards)."""
    target = folder / name
    backup = folder.parent / f"{name}.orig"
    existed = target.exists()
    if existed:
        shutil.copyfile(target, backup)
    target.write_bytes(data)
    try:
        yield target
    finally:
        target.unlink()
        if existed:
            shutil.move(backup, target)


# ---------------------------------------------------------------- fine-tuning
def _finetune_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    seqs = ["ACGTACGTAC", "GGGCCCGGGC", "ATATATATAT", "GCGCGCATAT", "TTTTAAAACC", "CAGTCAGTCA"] * 3
    (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{'gc' if s.count('G') > 2 else 'at'}\n"
                                                                     for s in seqs))
    return ["finetune", "--model", str(tmp_path / "lm"), "--task", "seq-cls", "--train", str(tmp_path / "train.csv"),
            "--out", str(out), "--epochs", "1", "--batch-size", "4", "--max-steps", "3", *extra]


def test_finetune_resume_never_unpickles(tmp_path, capsys):
    from launch.cli import main

    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    out = tmp_path / "ft"
    assert main(_finetune_args(tmp_path, out, "--exit-after-steps", "1")) == 0
    ckpt = next((out / "checkpoint").glob("step_*"))
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["meta.json", "model-tp00-pp00.safetensors", "optim-tp00-pp00.safetensors",
                     "rng-rank00000.safetensors", "state.safetensors"], files
    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    capsys.readouterr()
    for name in files:  # every file it reads: refused, one line, naming the file
        with planted(ckpt, name, payload):
            rc = main(_finetune_args(tmp_path, out, "--resume"))
            err = capsys.readouterr().err.strip()
        assert not marker.exists(), f"unpickled {name}"
        assert rc == 2 and name in err and len(err.splitlines()) == 1, (name, err)
    for name in ("rng-rank00000.pt", "state.pt"):  # the old pickle names: never read
        ckpt = next((out / "checkpoint").glob("step_*"))  # (each resume saves a newer one)
        (ckpt / name).write_bytes(payload)
        rc = main(_finetune_args(tmp_path, out, "--resume", "--exit-after-steps", "1"))
        assert not marker.exists(), f"unpickled {name}"
        assert rc == 0 and "resumed from" in capsys.readouterr().out
    # A directory holding only an old-format (pickle) checkpoint is refused, not read.
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    (old / "checkpoint" / "state.pt").write_bytes(payload)
    rc = main(_finetune_args(tmp_path, old, "--resume"))
    assert rc == 2 and "older format" in capsys.readouterr().err and not marker.exists()


def test_finetune_output_is_locked_refused_replaced_and_published_whole(tmp_path, capsys, monkeypatch):
    """`finetune --out` (launch/checkpoint/publish.py): the model is published whole with its
    checksums; a second run into the same --out is refused (--resume continues, --replace
    replaces); a full disk at the final save names the file and leaves the old model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import hyena_glt.checksums as checksums
    from launch.cli import main

    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    out = tmp_path / "ft"
    assert main(_finetune_args(tmp_path, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "checksums.json", "config.json",
                                                     "finetune_metrics.json", "head.json", "model.safetensors"]
    assert json.loads((out / "checksums.json").read_text())["files"].keys() == {"config.json", "head.json",
                                                                                 "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ft")) == ["ft"]  # no leftovers, no lock
    first = load_file(out / "model.safetensors")
    capsys.readouterr()
    rc = main(_finetune_args(tmp_path, out))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "already exists and is not empty (it holds a fine-tuned model)" in err and "--resume" in err, err
    assert "--replace" in err
    # a full disk while the replacement is saved: one line naming the file; the old model stays
    real = checksums.save_file

    def full(tensors, filename, *a, **k):
        if Path(filename).name.startswith("model.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(checksums, "save_file", full)
    rc = main(_finetune_args(tmp_path, out, "--replace", "--seed", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors: No space left on device (ENOSPC)" in err, err
    assert f"writing {out} failed" in err and "nothing was published" in err, err
    assert all(torch.equal(v, first[k]) for k, v in load_file(out / "model.safetensors").items())
    from hyena_glt import load_pretrained

    load_pretrained(out)  # the old directory, complete: it verifies and loads
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ft")) == ["ft"]
    monkeypatch.setattr(checksums, "save_file", real)
    rc = main(_finetune_args(tmp_path, out, "--replace", "--seed", "1"))
    assert rc == 0, capsys.readouterr().err
    second = load_file(out / "model.safetensors")
    assert any(not torch.equal(v, first[k]) for k, v in second.items())
    assert (out / "checkpoint").is_dir() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ft")) == ["ft"]
    # --resume continues a run in --out, but not into a directory holding other files
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = main(_finetune_args(tmp_path, out, "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "holds notes.txt, not written by finetune" in err and "--replace" in err, err


# ---------------------------------------------------------------- pretraining
@pytest.fixture
def pretraining_checkpoint(tmp_path):
    """A one-process pretraining model, one optimizer step, saved with launch.checkpoint."""
    from launch.checkpoint import save_checkpoint
    from launch.training.optimizer import AdamWSettings, PlainOptimizer
    from megatron_adapters.build import build_parallel_model
    from megatron_adapters.groups import destroy_parallel, initialize_parallel
    from megatron_adapters.parallel_config import ParallelConfig

    cfg = tiny()
    layout = initialize_parallel(ParallelConfig(), cfg, seq_length=32)
    try:
        pm = build_parallel_model(cfg, layout)
        opt = PlainOptimizer(pm, AdamWSettings(lr=1e-3, weight_decay=0.1))
        ids = torch.randint(4, 260, (2, 33), generator=torch.Generator().manual_seed(0))
        opt.step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], contextlib.nullcontext)
        meta = {"layout": {"tp": 1, "cp": 1, "pp": 1, "sp": False, "dp": 1, "world_size": 1, "zero_stage": 0}}
        torch.manual_seed(123)
        rng = torch.get_rng_state()
        path = save_checkpoint(tmp_path / "ckpt", 1, pm, opt, meta, keep=1)
        yield path, pm, opt, rng
    finally:
        destroy_parallel()


def test_pretraining_resume_never_unpickles(pretraining_checkpoint, tmp_path):
    from launch.checkpoint import load_checkpoint

    path, pm, opt, rng = pretraining_checkpoint
    files = sorted(p.name for p in path.iterdir())
    assert files == ["meta.json", "model-tp00-pp00.safetensors", "optim-tp00-pp00.safetensors",
                     "rng-rank00000.safetensors"], files
    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    for name in files:
        with planted(path, name, payload), pytest.raises(ValueError) as e:
            load_checkpoint(path, pm, opt)
        assert not marker.exists(), f"unpickled {name}"
        assert name in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    with planted(path, "rng-rank00000.pt", payload):  # the old RNG file name: never read
        torch.manual_seed(0)
        load_checkpoint(path, pm, opt)
    assert not marker.exists()
    assert torch.equal(torch.get_rng_state(), rng)  # restored from rng-rank00000.safetensors


# ---------------------------------------------------------------- structure
def test_no_pickle_loads_in_training_code():
    """No file of ours unpickles: the one torch.load (import-evo2 reading a released Evo 2
    file, a torch.save dict) restricts it to tensors with weights_only=True."""
    import re

    for d in ("launch", "megatron_adapters", "hyena_glt", "data_tools"):
        for p in (REPO / d).rglob("*.py"):
            text = p.read_text()
            for banned in ("weights_only=False", "pickle.load", "import pickle", "allow_pickle=True"):
                assert banned not in text, f"{p}: {banned}"
            for call in re.findall(r"torch\.load\(([^)]*)\)", text):
                assert "weights_only=True" in call, f"{p}: torch.load({call}) without weights_only=True"


# ----------------------------------------------------------------------------
# Checkpoints you can trust: a locked checkpoint.dir, pruning by step number, verified

REPO = Path(__file__).resolve().parents[2]
MODEL = "model-tp00-pp00.safetensors"
OPTIM = "optim-tp00-pp00.safetensors"


def _cli() -> list[str]:
    return [sys.executable, "-m", "launch.cli"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("HYENA_GLT_DEBUG", None)
    return env


def run(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or _cli()), *args], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=600)


def losses(out: Path) -> list[float]:
    rows = [r for r in metrics(out) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(rows) + 1)), f"duplicate or missing step lines: {steps}"
    return [r["loss"] for r in rows]


def snapshot(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under d (what 'nothing changed' compares)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "LOCK"}


def latest(out: Path) -> str:
    return (out / "ckpt" / "latest").read_text().strip()


def intact(step_dir: Path) -> bool:
    from launch.checkpoint import check_checkpoint

    return step_dir.is_dir() and not check_checkpoint(step_dir)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def packs(tiny_packs):
    return tiny_packs


@pytest.fixture(scope="module")
def reference(packs, tmp_path_factory) -> list[float]:
    """The per-step losses of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    proc = run(train_argv(packs, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


@pytest.fixture(scope="module")
def base(packs, tmp_path_factory) -> Path:
    """A run stopped after 2 of 4 steps: ckpt/step_00000001, step_00000002, latest -> step 2."""
    out = tmp_path_factory.mktemp("base")
    proc = run(train_argv(packs, out, "train.exit_after_steps=2", "checkpoint.every=1", "checkpoint.keep=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest(out) == "step_00000002" and intact(out / "ckpt" / "step_00000001")
    assert not (out / "ckpt" / "LOCK").exists()  # released at exit
    return out


# ---------------------------------------------------------------- the cases
@dataclass
class Ctx:
    out: Path  # the run's out_dir (a copy of base, or empty); the checkpoint dir is out/ckpt
    packs: Path
    reference: list[float]
    before: dict = field(default_factory=dict)  # snapshot of out before the command
    proc: "Ran | subprocess.CompletedProcess | None" = None
    holder: subprocess.Popen | None = None


def _hold_lock(c: Ctx) -> None:
    """Another process (alive for the whole case) holds the checkpoint dir's lock."""
    code = ("import sys, time\nfrom launch.checkpoint import DirLock\nDirLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    c.holder = subprocess.Popen([sys.executable, "-c", code, str(c.out / "ckpt")], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert c.holder.stdout.readline().strip() == "locked"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale_lock(c: Ctx) -> None:
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "pid_started": 1.0, "started": "2020-01-01 00:00:00"}
    (c.out / "ckpt" / "LOCK").write_text(json.dumps(lock))


def _old_higher_numbered(c: Ctx) -> None:
    """An old checkpoint numbered above the resumed one that cannot be resumed (meta.json gone),
    as an earlier run or a damaged disk leaves: it must not make pruning delete new work."""
    old = c.out / "ckpt" / "step_00000009"
    shutil.copytree(c.out / "ckpt" / "step_00000002", old)
    (old / "meta.json").unlink()


def _truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _unchanged(c: Ctx) -> None:
    assert snapshot(c.out) == c.before, "the command changed the checkpoint dir or metrics"


def _resumed_exactly(c: Ctx) -> None:
    assert losses(c.out) == c.reference  # bit for bit, one line per step
    assert latest(c.out) == f"step_{STEPS:08d}" and intact(c.out / "ckpt" / f"step_{STEPS:08d}")
    assert not (c.out / "ckpt" / "LOCK").exists()
    assert [r["step"] for r in metrics(c.out) if "val_loss" in r] == [STEPS]


def _pruned_by_number(c: Ctx) -> None:
    _resumed_exactly(c)
    names = sorted(p.name for p in (c.out / "ckpt").iterdir())
    assert names == ["latest", "step_00000004", "step_00000009.damaged"], names


def _fell_back(c: Ctx) -> None:
    _resumed_exactly(c)
    assert (c.out / "ckpt" / "step_00000002.damaged" / MODEL).stat().st_size == 1000  # kept, set aside


def _fresh_optimizer(c: Ctx) -> None:
    rows = losses(c.out)
    assert rows[:2] == c.reference[:2] and len(rows) == STEPS
    assert latest(c.out) == "step_00000004" and intact(c.out / "ckpt" / "step_00000004")


def _nothing_trained(c: Ctx) -> None:
    _unchanged(c)
    assert "step" not in c.proc.stdout  # stopped before any training step


def _converted_previous(c: Ctx) -> None:
    assert "converted" in c.proc.stdout and "step_00000001 (step 1," in c.proc.stdout
    assert (c.out / "model" / "model.safetensors").is_file()


def _nothing_converted(c: Ctx) -> None:
    _unchanged(c)
    assert not (c.out / "model" / "model.safetensors").exists()


def _failed_save(c: Ctx) -> None:
    ckpt = c.out / "ckpt"
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob("*.tmp-*")), sorted(os.listdir(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001", "step_00000002"]  # no tmp dir left
    assert latest(c.out) == "step_00000002" and intact(ckpt / "step_00000002")
    assert not (ckpt / "step_00000004").exists()
    assert "not a readable safetensors file" not in c.proc.stderr  # a write, not a damaged file


# ---- outputs written whole (launch/checkpoint/publish.py): convert into c.out/model
def _model(c: Ctx) -> Path:
    return c.out / "model"


def _beside_model(c: Ctx) -> list[str]:
    """What sits next to the output besides it: leftovers of interrupted runs, locks."""
    return sorted(p.name for p in c.out.iterdir() if p.name.startswith("model") and p.name != "model")


def _step_weights(c: Ctx, step: int) -> dict:
    from launch.checkpoint import full_model_state

    return full_model_state(c.out / "ckpt" / f"step_{step:08d}")


def _holds_step(c: Ctx, step: int) -> bool:
    """The model directory loads (verified) with the weights of checkpoint `step`."""
    model = HyenaGLTForCausalLM.from_pretrained(_model(c)).state_dict()
    return all(torch.equal(model[k], v) for k, v in _step_weights(c, step).items())


def _old_output(c: Ctx) -> None:
    """c.out/model: the conversion of step 1 (what a --replace must keep until the new one is complete)."""
    rc, _, err = run_cli("convert", c.out / "ckpt" / "step_00000001", _model(c))
    assert rc == 0 and _holds_step(c, 1), err


def _non_empty_output(c: Ctx) -> None:
    _model(c).mkdir()
    (_model(c) / "notes.txt").write_text("mine")


def _stale_output_lock_and_leftovers(c: Ctx) -> None:
    """A convert killed mid-write: its lock (PID gone) and its unfinished output beside OUT."""
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "pid_started": 1.0, "started": "2020-01-01 00:00:00"}
    (c.out / "model.LOCK").write_text(json.dumps(lock))
    (c.out / "model.partial-deadbeef").mkdir()
    (c.out / "model.partial-deadbeef" / "config.json").write_text("{")


def _hold_output_lock(c: Ctx) -> None:
    """Another live process writes c.out/model (holds its lock, model.LOCK)."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom launch.checkpoint import DirLock\n"
            "out = Path(sys.argv[1])\nDirLock(out, out.with_name(out.name + '.LOCK'), 'output directory').acquire()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    c.holder = subprocess.Popen([sys.executable, "-c", code, str(_model(c))], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert c.holder.stdout.readline().strip() == "locked"


def _output_unchanged(c: Ctx) -> None:
    _unchanged(c)
    assert _beside_model(c) == [], _beside_model(c)


def _old_output_kept(c: Ctx) -> None:
    _output_unchanged(c)
    assert _holds_step(c, 1)


def _converted_latest(c: Ctx) -> None:
    assert _holds_step(c, 2) and _beside_model(c) == [], _beside_model(c)
    assert json.loads((_model(c) / "checksums.json").read_text())["files"].keys() == {"config.json",
                                                                                       "model.safetensors"}


def _resharded(c: Ctx) -> None:
    re = c.out / "re"
    assert sorted(p.name for p in re.iterdir()) == ["latest", "step_00000002"] and intact(re / "step_00000002")
    assert sorted(p.name for p in c.out.iterdir() if p.name.startswith("re")) == ["re"]


def _busy_checkpoint_dir(c: Ctx) -> None:
    """c.out/re: a copy of the checkpoint dir that a live training run uses (holds re/LOCK)."""
    shutil.copytree(c.out / "ckpt", c.out / "re")
    code = ("import sys, time\nfrom launch.checkpoint import DirLock\nDirLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    c.holder = subprocess.Popen([sys.executable, "-c", code, str(c.out / "re")], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert c.holder.stdout.readline().strip() == "locked"


def _convert_disk_fills(mp: pytest.MonkeyPatch) -> None:
    _full_disk_on_call(mp, 1)  # the weights file of the model directory


def _final_eval_failed_steps_kept(c: Ctx) -> None:
    assert losses(c.out) == c.reference  # the 4 steps ran
    assert latest(c.out) == "step_00000004" and intact(c.out / "ckpt" / "step_00000004")


def _full_disk_on_call(mp: pytest.MonkeyPatch, n: int) -> None:
    """safetensors' writer fails on its n-th call from now as it does on a full disk: with its
    own error type (SafetensorError, not an OSError) and the OS error only in the message."""
    from safetensors import SafetensorError

    import hyena_glt.checksums as checksums

    real, calls = checksums.save_file, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*a, **k)

    mp.setattr(checksums, "save_file", full)


def _disk_fills(mp: pytest.MonkeyPatch) -> None:
    """The tensor writer fails with ENOSPC on the 2nd file of the next save (the model file
    written, the optimizer file not)."""
    _full_disk_on_call(mp, 2)


def _evaluation_fails(mp: pytest.MonkeyPatch) -> None:
    """An evaluation that fails (its data became unreadable mid-run)."""
    import launch.training.trainer as t

    def fail(self):
        raise ValueError("simulated: the validation data became unreadable")

    mp.setattr(t.Trainer, "evaluate", fail)


@dataclass
class Case:
    id: str
    damage: Callable[[Ctx], None] | None
    command: Callable[[Ctx], list[str]]
    rc: int
    fragments: Callable[[Ctx], list[str]]
    after: Callable[[Ctx], None]
    from_base: bool = True
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # applied inside the command's process


def _train(*overrides: str):
    return lambda c: train_argv(c.packs, c.out, *overrides)


CASES = [
    Case("second-run-on-locked-dir", _hold_lock, _train(), 2,
         lambda c: ["is in use by another run", str(c.out / "ckpt"), socket.gethostname(), f"PID {c.holder.pid}"],
         _unchanged),
    Case("stale-lock-of-dead-pid", _stale_lock, _train(), 0,
         lambda c: ["took over the stale lock", "is not running", "resumed from"], _resumed_exactly),
    Case("resume-false-into-dir-with-checkpoints", None, _train("checkpoint.resume=false"), 2,
         lambda c: ["checkpoint.resume=false", str(c.out / "ckpt"), "use another checkpoint.dir",
                    "checkpoint.resume=true"], _unchanged),
    Case("higher-numbered-old-checkpoint-and-pruning", _old_higher_numbered,
         _train("checkpoint.every=1", "checkpoint.keep=1"), 0,
         lambda c: ["step_00000009 is damaged", "meta.json: missing", "resuming from step_00000002"], _pruned_by_number),
    Case("truncated-model-in-latest-falls-back", lambda c: _truncate(c.out / "ckpt" / "step_00000002" / MODEL), _train(),
         0, lambda c: ["step_00000002 is damaged", MODEL, "resuming from step_00000001"], _fell_back),
    Case("every-checkpoint-damaged-is-refused",
         lambda c: [_truncate(c.out / "ckpt" / s / MODEL) for s in ("step_00000001", "step_00000002")], _train(), 2,
         lambda c: ["no intact checkpoint", str(c.out / "ckpt" / "step_00000002" / MODEL)], _unchanged),
    Case("missing-optimizer-file-is-an-error", lambda c: (c.out / "ckpt" / "step_00000002" / OPTIM).unlink(), _train(),
         2, lambda c: [str(c.out / "ckpt" / "step_00000002" / OPTIM), "missing", "checkpoint.fresh_optimizer=true"],
         _unchanged),
    Case("missing-optimizer-file-with-fresh-optimizer", lambda c: (c.out / "ckpt" / "step_00000002" / OPTIM).unlink(),
         _train("checkpoint.fresh_optimizer=true"), 0,
         lambda c: ["resumed from", "step_00000002", "fresh_optimizer=true"], _fresh_optimizer),
    Case("missing-latest-resumes-newest", lambda c: (c.out / "ckpt" / "latest").unlink(), _train(), 0,
         lambda c: ["latest is missing", "resuming from step_00000002"], _resumed_exactly),
    Case("missing-latest-and-every-meta-is-refused",
         lambda c: [p.unlink() for p in [c.out / "ckpt" / "latest", *(c.out / "ckpt").glob("step_*/meta.json")]],
         _train(), 2, lambda c: ["no intact checkpoint", str(c.out / "ckpt" / "step_00000002" / "meta.json"), "missing"],
         _unchanged),
    # docs/checkpoints.md, "What a resume may change": the windows, the model, the seed are not
    Case("resume-with-another-seq-len-is-refused", None, _train("train.seq_len=64"), 2,
         lambda c: ["this run changes train.seq_len from 128 to 64", "set train.seq_len=128", "docs/checkpoints.md"],
         _unchanged),
    Case("resume-with-another-model-is-refused", None, _train("model.pattern=SDHH"), 2,
         lambda c: ["this run changes model.pattern from 'SDH*SDH*' to 'SDHH'", "new checkpoint.dir"], _unchanged),
    Case("resume-with-other-validation-logging-and-layout-settings", None,
         _train("train.eval_batches=1", "train.log_every=2", "checkpoint.keep=3", "train.peer_timeout_s=30"), 0,
         lambda c: ["resumed from", "step_00000002"], _resumed_exactly),
    Case("bad-data-val-path-fails-at-start", None, lambda c: [*train_argv(c.packs, c.out), "data.val=/nonexistent/val"],
         2, lambda c: ["data.val", "/nonexistent/val", "does not exist"], _nothing_trained),
    Case("convert-damaged-dir-falls-back", lambda c: _truncate(c.out / "ckpt" / "step_00000002" / MODEL),
         lambda c: ["convert", str(c.out / "ckpt"), str(c.out / "model")], 0,
         lambda c: ["step_00000002 is damaged", MODEL, "using step_00000001"], _converted_previous),
    Case("convert-damaged-step-is-refused", lambda c: _truncate(c.out / "ckpt" / "step_00000002" / MODEL),
         lambda c: ["convert", str(c.out / "ckpt" / "step_00000002"), str(c.out / "model")], 2,
         lambda c: [str(c.out / "ckpt" / "step_00000002" / MODEL), "1000 bytes"], _nothing_converted),
    Case("failed-save-enospc", None, _train(), 2,
         lambda c: ["saving checkpoint step_00000004", f"/{OPTIM}: No space left on device (ENOSPC)", "as they were"],
         _failed_save, patch=_disk_fills),
    # outputs written whole: refused when not empty, replaced with --replace, locked
    Case("convert-into-non-empty-dir-is-refused", _non_empty_output,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c))], 2,
         lambda c: [str(_model(c)), "already exists and is not empty", "--replace"], _output_unchanged),
    Case("convert-over-a-model-without-replace-is-refused", _old_output,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c))], 2,
         lambda c: [str(_model(c)), "already exists and is not empty", "--replace"], _old_output_kept),
    Case("convert-replace-swaps-the-new-model-in", _old_output,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c)), "--replace"], 0,
         lambda c: ["converted", "step_00000002 (step 2,"], _converted_latest),
    Case("convert-takes-over-a-stale-output-lock", _stale_output_lock_and_leftovers,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c))], 0,
         lambda c: ["took over the stale lock", "is not running", "removed model.partial-deadbeef"], _converted_latest),
    Case("convert-while-another-writes-the-output-is-refused", _hold_output_lock,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c))], 2,
         lambda c: [f"output directory {_model(c)} is in use by another run", f"PID {c.holder.pid}"],
         lambda c: _unchanged(c)),
    Case("reshard-writes-a-new-checkpoint-dir", None,
         lambda c: ["reshard", str(c.out / "ckpt"), str(c.out / "re"), "parallel.tp=1"], 0,
         lambda c: ["resharded"], _resharded),
    Case("reshard-into-non-empty-dir-is-refused", lambda c: shutil.copytree(c.out / "ckpt", c.out / "re"),
         lambda c: ["reshard", str(c.out / "ckpt"), str(c.out / "re"), "parallel.tp=1"], 2,
         lambda c: [str(c.out / "re"), "already exists and is not empty", "--replace"], _unchanged),
    Case("reshard-replace-of-a-checkpoint-dir-in-use-is-refused", _busy_checkpoint_dir,
         lambda c: ["reshard", str(c.out / "ckpt"), str(c.out / "re"), "parallel.tp=1", "--replace"], 2,
         lambda c: [f"checkpoint.dir {c.out / 're'} is in use by another run", f"PID {c.holder.pid}"], _unchanged),
    Case("convert-enospc-names-the-file-and-publishes-nothing", None,
         lambda c: ["convert", str(c.out / "ckpt"), str(_model(c))], 2,
         lambda c: [f"writing {_model(c)} failed", "/model.safetensors: No space left on device (ENOSPC)",
                    "nothing was published"], _output_unchanged, patch=_convert_disk_fills),
    Case("final-evaluation-fails-after-the-final-save", None, _train(), 2,
         lambda c: ["saved checkpoint", "validation data became unreadable"], _final_eval_failed_steps_kept,
         patch=_evaluation_fails),
]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damage_table(case: Case, packs, base, reference, tmp_path, monkeypatch):
    """Each command runs in this process (the CLI's own entry point, `run_cli`): a fresh
    interpreter per case would cost ~4 s of imports, 20 times over."""
    out = tmp_path / "run"
    if case.from_base:
        shutil.copytree(base, out)
    c = Ctx(out=out, packs=packs, reference=reference)
    monkeypatch.delenv("HYENA_GLT_DEBUG", raising=False)
    try:
        if case.damage:
            case.damage(c)
        c.before = snapshot(out)
        if case.patch:
            case.patch(monkeypatch)
        c.proc = Ran(*run_cli(*case.command(c)))
    finally:
        if c.holder is not None:
            c.holder.kill()
            c.holder.wait()
    text = c.proc.stdout + c.proc.stderr
    assert c.proc.returncode == case.rc, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    for fragment in case.fragments(c):
        assert fragment in text, (fragment, text[-4000:])
    if case.rc != 0:  # one line, naming the problem
        errors = [x for x in c.proc.stderr.splitlines() if "error:" in x]
        assert len(errors) == 1 and len(c.proc.stderr.strip().splitlines()) == 1, c.proc.stderr
    case.after(c)


# ---------------------------------------------------------------- SIGTERM (preemption)
def lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_sigterm_checkpoint_holds_the_weights_of_its_step(packs, tmp_path):
    """SIGTERM (what SLURM sends before a preemption) in the middle of a run: the run finishes the
    step it is on, saves it and exits 0. That checkpoint equals, tensor for tensor and bit for bit
    (model and optimizer), the one the same run writes when train.exit_after_steps stops it at that
    step; and it converts to a model that loads with those weights."""
    from launch.checkpoint import read_tensors

    out = tmp_path / "run"
    proc = subprocess.Popen([*_cli(), *train_argv(packs, out, "train.steps=500")], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        while time.time() < deadline and proc.poll() is None and len(lines(out)) < 2:  # 2 steps logged
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-3000:]
    step = len(losses(out))
    assert 2 <= step < 500
    assert f"saving at step {step} and exiting" in text and latest(out) == f"step_{step:08d}"
    saved = out / "ckpt" / f"step_{step:08d}"
    assert intact(saved) and json.loads((saved / "meta.json").read_text())["step"] == step
    ref = tmp_path / "ref"
    proc = run(train_argv(packs, ref, "train.steps=500", f"train.exit_after_steps={step}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = ref / "ckpt" / f"step_{step:08d}"
    assert losses(ref) == losses(out)
    for name in (MODEL, OPTIM):
        got, expected = read_tensors(saved / name), read_tensors(want / name)
        assert got.keys() == expected.keys() and got, name
        for k in expected:
            assert torch.equal(got[k], expected[k]), (name, k)
    from conftest import run_cli

    rc, _, err = run_cli("convert", out / "ckpt", tmp_path / "model")
    assert rc == 0, err
    model = HyenaGLTForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    weights = read_tensors(saved / MODEL)
    assert all(torch.equal(model[k], weights[k]) for k in weights) and set(weights) <= set(model)


# ---------------------------------------------------------------- kill at random moments
def _step_tmp(ckpt: Path, step: int) -> list[Path]:
    return list(ckpt.glob(f"step_{step:08d}.*.tmp"))


@pytest.mark.slow
def test_sigkill_during_saves_then_resume_gives_the_uninterrupted_losses(packs, reference, tmp_path):
    """SIGKILL a run in the middle of saves (tests/support/slow_saves makes a save sleep after each
    file it writes: model, optimizer, RNG, meta.json), at several moments, resuming each time; the
    last resume runs to the end. Per-step losses equal the uninterrupted run's bit for bit and
    metrics.jsonl holds one line per step."""
    delay = 0.5
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    args = train_argv(packs, out, "checkpoint.every=1", "checkpoint.keep=2")
    # (the step whose save is hit, seconds after its temporary folder appears)
    kills = [(2, 0.25), (3, 0.75), (4, 1.25), (4, 1.75)]
    seen = []
    for i, (step, after) in enumerate(kills):
        stale = set(_step_tmp(ckpt, step))  # left by the previous kill: removed at start-up
        log = open(tmp_path / f"attempt{i}.log", "w")
        proc = subprocess.Popen([*_cli(), *args], cwd=REPO, env=_env(**slow_saves_env(delay)),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while not set(_step_tmp(ckpt, step)) - stale and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, (tmp_path / f"attempt{i}.log").read_text()[-3000:]
            time.sleep(after)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            log.close()
        tmp = sorted(set(_step_tmp(ckpt, step)) - stale)
        assert tmp, f"kill {i} did not land inside the save of step {step}"
        seen.append(sorted(p.name for p in tmp[0].iterdir()))
        assert (ckpt / "LOCK").exists()  # left behind by the killed process
    # the kills landed at different moments of the save
    assert len({len(files) for files in seen}) >= 3, seen
    proc = run(args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "took over the stale lock" in text and "removed what interrupted saves left" in text, text[-4000:]
    assert losses(out) == reference
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [STEPS]
    assert latest(out) == f"step_{STEPS:08d}" and intact(ckpt / f"step_{STEPS:08d}")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    for i in range(1, len(kills)):  # every resume took over the lock and tidied the dir
        text = (tmp_path / f"attempt{i}.log").read_text()
        assert "took over the stale lock" in text and "resumed from" in text, text[-3000:]


# ---------------------------------------------------------------- kill while an output is published
OUTPUT_WRITES = ["hyena_glt.checksums:write_text_atomic", "hyena_glt.checksums:write_safetensors",
                 "launch.checkpoint.publish:_rename"]


def _output_state(out: Path, old: dict, new: dict) -> str:
    """What a killed `convert --replace` left at `out`: 'old' or 'new' (a complete, verified model
    directory with those weights) or 'absent' (nothing at `out`: the old one must then be intact
    beside it, as out.replaced-*). Anything else fails the test."""
    beside = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))
    assert all(n == f"{out.name}.LOCK" or n.startswith((f"{out.name}.partial-", f"{out.name}.replaced-"))
               for n in beside), beside
    if not out.exists():
        aside = [out.parent / n for n in beside if ".replaced-" in n]
        assert len(aside) == 1, beside
        got = HyenaGLTForCausalLM.from_pretrained(aside[0]).state_dict()
        assert all(torch.equal(got[k], v) for k, v in old.items()), "the set-aside output is not the old one"
        return "absent"
    got = HyenaGLTForCausalLM.from_pretrained(out).state_dict()  # verified against its checksums.json
    for name, want in (("old", old), ("new", new)):
        if all(torch.equal(got[k], v) for k, v in want.items()):
            return name
    raise AssertionError(f"{out} holds neither the old nor the new model")


@pytest.mark.slow
def test_sigkill_during_convert_leaves_the_old_or_the_new_model(base, tmp_path):
    """SIGKILL `convert --replace` over an existing model directory at several moments (the
    slow-saves hook sleeps after each file it writes and each rename of the swap): every time
    the directory holds the old complete model or the new complete one (or, between the two
    renames of the swap, nothing, the old one intact beside it), and the next convert takes
    over the stale lock, clears what was left and publishes the new model."""
    from launch.checkpoint import full_model_state

    delay = 0.6
    out = tmp_path / "run"
    shutil.copytree(base, out)
    model = out / "model"
    old, new = (full_model_state(out / "ckpt" / f"step_{s:08d}") for s in (1, 2))
    rc, _, err = run_cli("convert", out / "ckpt" / "step_00000001", model)
    assert rc == 0, err
    args = ["convert", str(out / "ckpt"), str(model), "--replace"]
    # seconds after the new config.json appears: config written; + weights; + checksums.json;
    # + the old directory set aside; + the new one renamed in
    moments = [0.5 * delay, 1.5 * delay, 2.5 * delay, 3.5 * delay, 4.5 * delay]
    seen, states = [], []
    for i, after in enumerate(moments):
        log = open(tmp_path / f"attempt{i}.log", "w")
        proc = subprocess.Popen([*_cli(), *args], cwd=REPO, env=_env(**slow_saves_env(delay, OUTPUT_WRITES)),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline and not list(out.glob("model.partial-*/config.json")):
                time.sleep(0.01)
            assert proc.poll() is None, (tmp_path / f"attempt{i}.log").read_text()[-3000:]
            time.sleep(after)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            log.close()
        partial = [sorted(q.name for q in p.iterdir()) for p in out.glob("model.partial-*")]
        seen.append((partial[0] if partial else None, model.exists()))
        states.append(_output_state(model, old, new))
        assert (out / "model.LOCK").exists()  # left behind by the killed process
        if i + 1 < len(moments):  # the next attempt clears this one's leftovers; reset to the old model
            rc, _, err = run_cli("convert", out / "ckpt" / "step_00000001", model, "--replace")
            assert rc == 0 and _output_state(model, old, new) == "old", err
    assert len(set(map(str, seen))) >= 4, seen  # the kills landed at different moments
    assert {"old", "new"} <= set(states), states
    proc = run(args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "took over the stale lock" in text, text[-3000:]
    assert _output_state(model, old, new) == "new"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model"]


def test_an_interrupted_swap_is_put_back(tmp_path):
    """The moments between the renames of a swap, replayed: recover() puts the old output back
    (or, once every new output is in place, removes the old one), for one directory and for a
    pair of files (export-vortex's OUT.pt + OUT.yml)."""
    from launch.checkpoint.publish import partial_path, recover, replaced_path

    out, tok = tmp_path / "model", "0123abcd"
    # the old directory set aside, the new one not renamed in yet
    replaced_path(out, tok).mkdir()
    (replaced_path(out, tok) / "weights").write_text("old")
    partial_path(out, tok).mkdir()
    (partial_path(out, tok) / "weights").write_text("new")
    said = recover([out], log=None)
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"], said
    # renamed in, the old one not removed yet: committed
    replaced_path(out, tok).mkdir()
    recover([out], log=None)
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a pair: the old .pt set aside and the new .pt in, the .yml not yet
    pt, yml = tmp_path / "e.pt", tmp_path / "e.yml"
    pt.write_text("old pt")
    yml.write_text("old yml")
    replaced_path(yml, tok).write_text("old yml")
    yml.unlink()  # set aside
    replaced_path(pt, tok).write_text("old pt")
    pt.write_text("new pt")  # renamed in
    partial_path(yml, tok).write_text("new yml")
    recover([pt, yml], log=None)
    assert pt.read_text() == "old pt" and yml.read_text() == "old yml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt", "e.yml", "model"]
    # a pair with no old outputs: the .pt renamed in, the .yml not yet -> nothing is left
    pt.unlink()
    yml.unlink()
    pt.write_text("new pt")
    partial_path(yml, tok).write_text("new yml")
    recover([pt, yml], log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------- in-process units
def test_pruning_orders_by_step_number_and_keeps_newer(tmp_path):
    from launch.checkpoint import prune, step_dirs

    for name in ("step_99999998", "step_99999999", "step_100000000", "step_100000001", "step_00000005.damaged"):
        (tmp_path / name).mkdir()
    assert [p.name for p in step_dirs(tmp_path)] == ["step_99999998", "step_99999999", "step_100000000",
                                                     "step_100000001"]
    prune(tmp_path, keep=2, step=100000000)  # just saved 100000000; 100000001 is newer: never deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005.damaged", "step_100000000",
                                                          "step_100000001", "step_99999999"]


def test_metrics_resume_drops_later_and_cut_lines(tmp_path):
    from launch.training.metrics import MetricsLog

    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.5},
             {"step": 3, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    m = MetricsLog(tmp_path, resume_step=2)
    m.write({"step": 3, "loss": 3.5})
    m.close()
    assert metrics(tmp_path) == [*lines[:3], {"step": 3, "loss": 3.5}] and m.dropped == 2
    m = MetricsLog(tmp_path, resume_step=3, keep_evals_at_step=False)  # a final evaluation to redo
    m.close()
    assert metrics(tmp_path) == [*lines[:3], {"step": 3, "loss": 3.5}]


def test_not_enough_disk_for_one_checkpoint_fails_at_start(packs, tmp_path, monkeypatch):
    from launch.training.config import TrainConfig
    from launch.training.startup import check_start, checkpoint_bytes

    cfg = TrainConfig.load(CONFIG, train_argv(packs, tmp_path)[3:])
    n, need = checkpoint_bytes(cfg.model)
    assert need == n * 12 and n > 100_000
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(ValueError, match=r"checkpoint\.dir: .* has \d[\d,.]* MiB free, one checkpoint needs about "
                                         r"\d[\d,.]* MiB \(") as e:
        check_start(cfg)
    assert "0.00" not in str(e.value), str(e.value)  # a size in a unit it fills, not "0.00 GiB"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    check_start(cfg)


def test_lock_refuses_a_live_owner_and_is_released(tmp_path):
    from launch.checkpoint import CheckpointError, DirLock

    lock = DirLock(tmp_path).acquire()
    held = json.loads((tmp_path / "LOCK").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    other = {**held, "pid": os.getppid(), "pid_started": None}  # a live process on this host
    (tmp_path / "LOCK").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match=f"in use by another run .*PID {os.getppid()}"):
        DirLock(tmp_path).acquire()
    lock.release()  # not ours any more: left alone
    assert (tmp_path / "LOCK").exists()
    (tmp_path / "LOCK").write_text(json.dumps({**other, "host": "elsewhere"}))
    with pytest.raises(CheckpointError, match=f"another host .*delete {tmp_path / 'LOCK'}"):
        DirLock(tmp_path).acquire()
    (tmp_path / "LOCK").unlink()
    lock = DirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "LOCK").exists()


@pytest.mark.parametrize("env,held_env,taken", [
    # a torchrun restart (--rdzv-id set) that put rank 0 on another host than the lost one
    ({"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"},
     {"torchrun_run": "job7", "attempt": ["0", "0"]}, "an earlier attempt of torchrun run job7"),
    # the same attempt: a live run elsewhere, refused
    ({"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "0"}, {"torchrun_run": "job7", "attempt": ["0", "0"]},
     None),
    # torchrun's default id "none" is shared by unrelated runs: no identity
    ({"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "1"}, {"torchrun_run": None, "attempt": ["0", "0"]},
     None),
    ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}, {"slurm_job": "42", "attempt": ["0", "0"]},
     "an earlier attempt of SLURM job 42"),
])
def test_lock_of_an_earlier_attempt_on_another_host_is_taken_over(tmp_path, monkeypatch, env, held_env, taken):
    from launch.checkpoint import CheckpointError, DirLock

    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    held = {"host": "lost-node", "pid": 1234, "pid_started": None, "slurm_job": None, "torchrun_run": None, **held_env}
    (tmp_path / "LOCK").write_text(json.dumps(held))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    said = []
    if taken is None:
        with pytest.raises(CheckpointError, match="locked by a run on another host"):
            DirLock(tmp_path).acquire(said.append)
        return
    DirLock(tmp_path).acquire(said.append).release()
    assert len(said) == 1 and "stale lock of PID 1234 on lost-node" in said[0] and taken in said[0], said


def test_save_failure_errno_is_one_line():
    from launch.checkpoint import oneline

    assert oneline(OSError(errno.ENOSPC, "No space left on device")) == "[Errno 28] No space left on device"
