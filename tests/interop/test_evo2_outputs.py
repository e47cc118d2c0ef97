"""What `import-evo2` and `export-vortex` write is published whole (launch/checkpoint/publish.py):
locked (`OUT.LOCK`, a stale lock taken over), written beside the output and renamed into place
when complete, a non-empty output refused without `--replace` and swapped in whole with it; a
kill at any moment leaves the old complete output, the new complete one, or nothing that loads
(Vortex needs both OUT.pt and OUT.yml). The model directory import-evo2 writes carries
checksums.json; export-vortex keeps Vortex's own format (no file added) and refuses a damaged
source directory. No Vortex needed: releases come from our own export.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from support import evo2_oracle as oracle
from support import slow_saves_env

from launch.interop import evo2

REPO = Path(__file__).resolve().parents[2]
run = run_cli


def _model(tmp_path: Path, name: str, seed: int) -> Path:
    """A random exportable hyena-glt model directory (a tiny Evo 2 config, our own mapping)."""
    from hyena_glt import HyenaGLTForCausalLM

    cfg = evo2.config_from_evo2(oracle.tiny_config("evo2-7b-8k"))
    torch.manual_seed(seed)
    model = HyenaGLTForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def two_models(tmp_path):
    return _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)


def test_export_refuses_existing_outputs_and_replaces_them_with_the_flag(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run("export-vortex", a, out / "e.pt", "--model-name", "old")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["e.pt", "e.yml"]  # Vortex's format, nothing added
    before = _files(out)
    rc, _, err = run("export-vortex", b, out / "e.pt", "--model-name", "new")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out / 'e.pt'} already exists and is not empty" in err and "--replace" in err, err
    assert _files(out) == before
    # the config alone exists: refused the same way
    rc, _, err = run("export-vortex", b, out / "f.pt", "--config-out", out / "e.yml")
    assert rc == 2 and f"{out / 'e.yml'} already exists" in err, err
    assert _files(out) == before
    rc, _, err = run("export-vortex", b, out / "e.pt", "--model-name", "new", "--replace")
    assert rc == 0, err
    after = _files(out)
    assert sorted(after) == ["e.pt", "e.yml"]  # no leftovers, no lock
    assert after["e.pt"] != before["e.pt"] and "model_name: new" in after["e.yml"].decode()
    rc, _, err = run("export-vortex", b, tmp_path / "ref.pt", "--model-name", "new")
    assert rc == 0, err
    assert torch.equal(oracle.load_release(out / "e.pt")["embedding_layer.weight"],
                       oracle.load_release(tmp_path / "ref.pt")["embedding_layer.weight"])


def test_import_replaces_a_model_directory_with_the_flag(two_models, tmp_path):
    from hyena_glt import HyenaGLTForCausalLM

    a, b = two_models
    for m in (a, b):
        rc, _, err = run("export-vortex", m, tmp_path / f"{m.name}.pt")
        assert rc == 0, err
    rc, _, err = run("import-evo2", tmp_path / "a.pt", "--config", tmp_path / "a.yml", tmp_path / "imported")
    assert rc == 0, err
    saved = json.loads((tmp_path / "imported" / "checksums.json").read_text())["files"]
    assert set(saved) == {"config.json", "model.safetensors"}
    rc, _, err = run("import-evo2", tmp_path / "b.pt", "--config", tmp_path / "b.yml", tmp_path / "imported")
    assert rc == 2 and "already exists and is not empty" in err and "--replace" in err, err
    rc, _, err = run("import-evo2", tmp_path / "b.pt", "--config", tmp_path / "b.yml", tmp_path / "imported",
                     "--replace")
    assert rc == 0, err
    rc, _, err = run("import-evo2", tmp_path / "b.pt", "--config", tmp_path / "b.yml", tmp_path / "reference")
    assert rc == 0, err
    got = HyenaGLTForCausalLM.from_pretrained(tmp_path / "imported").state_dict()
    want = HyenaGLTForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("imported")) == ["imported"]


def test_export_takes_over_a_stale_lock_and_clears_leftovers(two_models, tmp_path):
    a, _ = two_models
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "pid_started": 1.0, "started": "2020-01-01 00:00:00"}
    (tmp_path / "e.pt.LOCK").write_text(json.dumps(lock))
    (tmp_path / "e.pt.partial-0badc0de").write_bytes(b"half a file")
    rc, _, err = run("export-vortex", a, tmp_path / "e.pt")
    assert rc == 0, err
    assert "took over the stale lock" in err and "is not running" in err and "e.pt.partial-0badc0de" in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("e.")) == ["e.pt", "e.yml"]


def test_export_refuses_a_damaged_source_directory(two_models, tmp_path):
    a, _ = two_models
    f = a / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64] ^= 0x01  # one bit inside the tensor data: safetensors still parses it
    f.write_bytes(bytes(data))
    rc, _, err = run("export-vortex", a, tmp_path / "e.pt")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{f}: damaged: sha256" in err and "but checksums.json expects" in err, err
    assert not list(tmp_path.glob("e.*"))


def _pair_state(pt: Path, yml: Path, old: tuple[bytes, bytes], new: tuple[bytes, bytes]) -> str:
    """'old' or 'new' (both files, as one of the two exports wrote them) or 'none' (a file
    missing: nothing Vortex can load; the old files then intact beside, as *.replaced-*)."""
    names = sorted(p.name for p in pt.parent.iterdir() if p.name.startswith(("e.pt", "e.yml")))
    assert all(n in ("e.pt", "e.yml", "e.pt.LOCK", "e.yml.LOCK") or ".partial-" in n or ".replaced-" in n
               for n in names), names
    if pt.exists() and yml.exists():
        got = (pt.read_bytes(), yml.read_bytes())
        assert got in (old, new), "a mixed or damaged pair"
        return "old" if got == old else "new"
    for target, want in ((pt, old[0]), (yml, old[1])):
        aside = list(pt.parent.glob(f"{target.name}.replaced-*"))
        if not target.exists() and aside:
            assert aside[0].read_bytes() == want
    return "none"


@pytest.mark.slow
def test_sigkill_during_export_leaves_the_old_pair_the_new_pair_or_nothing(two_models, tmp_path):
    """SIGKILL `export-vortex --replace` over an existing OUT.pt + OUT.yml at several moments (the
    slow-saves hook sleeps after each rename of the swap: old .pt aside, old .yml aside, new .pt
    in, new .yml in): each time the pair is the old one, the new one, or incomplete (nothing
    Vortex loads); the next export takes over the lock, puts the old files back or removes
    them, and publishes the new pair."""
    a, b = two_models
    out = tmp_path / "out"
    out.mkdir()
    pt, yml = out / "e.pt", out / "e.yml"
    rc, _, err = run("export-vortex", b, pt, "--model-name", "new")
    assert rc == 0, err
    new = (pt.read_bytes(), yml.read_bytes())
    args = [sys.executable, "-m", "launch.cli", "export-vortex", str(b), str(pt), "--model-name", "new", "--replace"]
    delay = 0.6
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               **slow_saves_env(delay, ["launch.checkpoint.publish:_rename"]))
    env.pop("HYENA_GLT_DEBUG", None)
    # seconds after the new .yml appears (written right after the .pt): old .pt aside; old .yml
    # aside; new .pt in; new .yml in
    moments = [None, 0.5 * delay, 1.5 * delay, 2.5 * delay, 3.5 * delay]
    states, old = [], None
    for i, after in enumerate(moments):
        rc, _, err = run("export-vortex", a, pt, "--model-name", "old", "--replace")  # the output to replace
        assert rc == 0, err
        old = (pt.read_bytes(), yml.read_bytes())
        log = open(tmp_path / f"attempt{i}.log", "w")
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            wanted = "e.pt.partial-*" if after is None else "e.yml.partial-*"  # None: while the .pt is written
            while proc.poll() is None and time.time() < deadline and not list(out.glob(wanted)):
                time.sleep(0.005)
            assert proc.poll() is None, (tmp_path / f"attempt{i}.log").read_text()[-3000:]
            time.sleep(after or 0)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            log.close()
        states.append(_pair_state(pt, yml, old, new))
    assert {"old", "none", "new"} <= set(states), states
    rc, _, err = run("export-vortex", b, pt, "--model-name", "new", "--replace")
    assert rc == 0 and "took over the stale lock" in err, err
    assert (pt.read_bytes(), yml.read_bytes()) == new
    assert sorted(p.name for p in out.iterdir()) == ["e.pt", "e.yml"]
