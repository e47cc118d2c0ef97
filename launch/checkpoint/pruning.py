"""Removing checkpoints: old ones past `checkpoint.keep` (never one newer than the step just
saved), temporaries a crashed save left, and damaged ones set aside."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from launch.checkpoint.io import LOCK, step_dirs, step_of


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder: first renamed to a `*.tmp` name (atomic: a crash halfway never
    leaves a half-deleted `step_N`), then deleted. A symlinked checkpoint: only the link."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
        return
    gone = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.replace(path, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints by step number among those up to `step` (the one just
    saved); never one newer than it."""
    done = [p for p in step_dirs(root) if step_of(p) <= step]
    for old in done[:-keep]:
        remove_checkpoint(old)


def remove_stale_temporaries(root: str | Path) -> list[str]:
    """Delete what interrupted saves left in a checkpoint dir (`step_*.tmp` folders, `*.tmp-*`
    files, set-aside locks); returns their names. Only while no other run writes here (under
    the DirLock)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("step_") and p.name.endswith(".tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif ".tmp-" in p.name or p.name.startswith(f"{LOCK}.stale-"):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p.name)
    return removed


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to `step_N.damaged` (kept for inspection, never read
    or pruned again)."""
    target, i = path.with_name(path.name + ".damaged"), 1
    while target.exists() or target.is_symlink():
        i += 1
        target = path.with_name(f"{path.name}.damaged-{i}")
    os.replace(path, target)
    return target
