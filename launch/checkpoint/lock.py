"""One run per checkpoint (or output) directory: a LOCK file holding host, PID and start time;
a lock whose process is gone is taken over.

The lock itself lives in data_tools/dirlock.py (`hyena-glt pack` locks its output with it too,
and `data_tools` must not import `launch`); this module keeps its name for the checkpoint code:
the same `DirLock`, raising `CheckpointError`, with `ROOT/LOCK` as its default file."""

from __future__ import annotations

from pathlib import Path

from data_tools.dirlock import DirLock as _DirLock
from data_tools.dirlock import _alive, _process_start  # noqa: F401
from launch.checkpoint.io import LOCK, CheckpointError


class DirLock(_DirLock):
    """data_tools.dirlock.DirLock for a checkpoint.dir (or, with `lock_path` and `what`, an
    output that launch/checkpoint/publish.py writes); refusals are `CheckpointError`s."""

    error = CheckpointError

    def __init__(self, root: str | Path, lock_path: str | Path | None = None, what: str = "checkpoint.dir",
                 name: str | None = None):
        super().__init__(root, Path(root) / LOCK if lock_path is None else lock_path, what, name)
