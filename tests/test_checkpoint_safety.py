"""Checkpoints hold no pickle: a pickle planted in place of any checkpoint file is never run.

Fine-tuning (`hyena-glt finetune --resume`) and pretraining (launch.checkpoint.load_checkpoint,
what `hyena-glt train` resumes through) are each given a checkpoint in which one file at a
time is replaced by a pickle whose unpickling would create a marker file. Resuming must
refuse with a one-line ValueError naming the file, or ignore a file it does not read (the
old `rng-rank*.pt` / `state.pt` names); the marker must never appear. Plus: the RNG state
round-trips through safetensors. (That the fine-tuning modules import each other as a DAG
is tests/test_import_graph.py's.)
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- pretraining
@pytest.fixture
def pretraining_checkpoint(tmp_path):
    """A one-process pretraining model, one optimizer step, saved with launch.checkpoint."""
    from launch.checkpoint import save_checkpoint
    from launch.optim import AdamWSettings
    from launch.optimizer_step import PlainOptimizer
    from launch.trainer import build_model
    from megatron_adapters.groups import destroy_parallel, initialize_parallel
    from megatron_adapters.parallel_config import ParallelConfig

    cfg = tiny()
    layout = initialize_parallel(ParallelConfig(), cfg, seq_length=32)
    try:
        pm = build_model(cfg, layout)
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
