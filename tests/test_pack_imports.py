"""`hyena-glt pack` never imports torch: the import alone (1-3 s) would be most of a small
pack's time, and every pack worker is forked from that process (a fork of a process that
holds torch costs several times more)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from launch.cli import COMMAND_MODULES


def test_pack_command_imports_no_torch(tmp_path, lambda_phage):
    code = ("import sys; from launch.cli import main; "
            f"rc = main(['pack', {str(lambda_phage)!r}, '--out', {str(tmp_path / 'out')!r}, '--seq-len', '512', "
            "'--workers', '2', '--progress', 'none']); "
            "print(rc, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(None, 1) == ["0", "[]\n"], proc.stdout
    assert (tmp_path / "out" / "manifest.json").exists()


def test_command_table_names_what_each_module_registers():
    """`hyena-glt CMD` imports only the module that COMMAND_MODULES names for CMD, so the
    table must list exactly the subcommands each module adds."""
    for name, commands in COMMAND_MODULES.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        assert tuple(sub.choices) == commands, name
