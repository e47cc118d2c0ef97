"""Debian packages a test fixture needs (SLURM, sshd, pdsh, iproute2), installed with apt-get
when their commands are missing: CI starts from a fresh machine."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess


class Unavailable(Exception):
    """The packages cannot be installed or run on this machine (the reason is the message)."""


def ensure_installed(packages: tuple[str, ...], commands: tuple[str, ...]) -> None:
    """apt-get install `packages` unless every one of `commands` is already on PATH (or in /usr/sbin)."""
    if all(_which(c) for c in commands):
        return
    # `make test` runs two test workers; apt-get fails at once on the dpkg lock the other holds.
    with open("/tmp/hyena-glt-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(_which(c) for c in commands):
            _install(packages, commands)


def _install(packages: tuple[str, ...], commands: tuple[str, ...]) -> None:
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(c for c in commands if not _which(c))} missing and installing needs root")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(c for c in commands if not _which(c))} missing and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        # A fresh machine may have no package lists yet.
        update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        if update.returncode != 0:
            raise Unavailable(f"apt-get update failed (no network or no Debian registry): {update.stderr.strip()[-500:]}")
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(packages)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    missing = [c for c in commands if not _which(c)]
    if missing:
        raise RuntimeError(f"installed {' '.join(packages)} but {', '.join(missing)} is still missing")


def _which(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
