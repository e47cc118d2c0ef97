"""Every file a save writes gets one mode: what `open()` gives a new file under the process
umask (0o644 under the usual 022), weights included. safetensors itself writes 0o600, so
`model.safetensors` used to be 0o600 next to a 0o644 `config.json`.

Covered: save_pretrained (language model, task head), a training checkpoint (every file of a
step folder, written by launch/checkpoint/io.py) and `hyena-glt convert`'s output.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM
from hyena_glt.model import new_file_mode

TINY = dict(pattern="SD", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=256)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): oct(stat.S_IMODE(p.stat().st_mode))
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_new_file_mode_follows_the_umask(umask):
    assert new_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # reading it left it as it was


def test_save_pretrained_files_share_one_mode(tmp_path, umask):
    from hyena_glt.heads import HyenaGLTForSequenceClassification

    want = oct(0o666 & ~umask)
    HyenaGLTForCausalLM(HyenaGLTConfig(**TINY)).save_pretrained(tmp_path / "lm")
    assert _modes(tmp_path / "lm") == {"checksums.json": want, "config.json": want, "model.safetensors": want}
    head = HyenaGLTForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)
    head.save_pretrained(tmp_path / "head")
    assert _modes(tmp_path / "head") == {"checksums.json": want, "config.json": want, "head.json": want,
                                         "model.safetensors": want}
    # Saving again over an existing directory (the weights are replaced through a temporary file).
    HyenaGLTForCausalLM(HyenaGLTConfig(**TINY)).save_pretrained(tmp_path / "lm")
    assert set(_modes(tmp_path / "lm").values()) == {want}


def test_checkpoint_and_convert_output_share_one_mode(tiny_packs, tmp_path):
    from support.training import REPO, child_env, cli_command, train_argv

    old = os.umask(0o022)  # the training process inherits it
    try:
        proc = subprocess.run([*cli_command(), *train_argv(tiny_packs, tmp_path / "run", "train.steps=2")], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        rc, _, err = run_cli("convert", tmp_path / "run" / "ckpt", tmp_path / "model")
        assert rc == 0, err
    finally:
        os.umask(old)
    steps = sorted((tmp_path / "run" / "ckpt").glob("step_*"))
    assert steps
    saved = _modes(tmp_path / "run")  # every step folder, `latest`, the metrics
    assert any(name.endswith(".safetensors") for name in saved) and any(n.endswith("/meta.json") for n in saved), saved
    assert set(saved.values()) == {"0o644"}, saved
    converted = _modes(tmp_path / "model")
    assert set(converted) >= {"checksums.json", "config.json", "model.safetensors"}, converted
    assert set(converted.values()) == {"0o644"}, converted
