"""Start-up checks of a training run: what it will need, checked on every rank before any
process group or training step, each problem one line naming the file or option."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from launch.checkpoint.io import oneline
from launch.training.config import TrainConfig
from launch.training.cotrain import load_tasks


def _check_packs(data, key: str, split: str, conservation: bool = False) -> None:
    """Every pack of `key` exists, is a finished pack with `split` samples, and its first and
    last samples read back; with `conservation` (model.conservation) it holds scores."""
    from data_tools.dataset import PackedDataset
    from data_tools.loader import normalize_data

    for name in normalize_data(data):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"{key}: {path} does not exist (expected a directory written by `hyena-glt pack`)")
        if not path.is_dir():
            raise NotADirectoryError(f"{key}: {path} is not a directory (expected one written by `hyena-glt pack`)")
        try:
            ds = PackedDataset(path, split)
            try:
                if len(ds) == 0:
                    raise ValueError(f"the pack has no '{split}' samples")
                if conservation and not ds.conservation:
                    # The model's conservation gate would silently never see a score.
                    raise ValueError("model.conservation=true but the pack holds no conservation scores "
                                     "(pack with --conservation, docs/data.md)")
                ds.read(0)
                ds.read(len(ds) - 1)
            finally:
                ds.close()
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"{key}: {path} is not a usable pack: {oneline(e)}") from None


def _check_writable(path: str, key: str) -> Path:
    p = Path(path)
    probe = p / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{key}: {p} is not writable ({oneline(e)})") from None
    return p


def size_text(n: int) -> str:
    """A byte count in the largest binary unit it fills (never '0.00 GiB'): '12 bytes',
    '1.5 KiB', '230.4 MiB', '3.1 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


def checkpoint_bytes(model_cfg) -> tuple[int, int]:
    """(parameters, estimated bytes of one checkpoint): fp32 weights + two Adam states each."""
    from megatron_adapters.sharding import canonical_state

    n = sum(t.numel() for t in canonical_state(model_cfg).values())
    return n, n * 4 * 3


def check_start(cfg: TrainConfig) -> dict | None:
    """What the run will need, checked before any process group or training step (every rank,
    the same result): the train and val packs, the task files, writable out_dir and
    checkpoint.dir, and the free disk for one checkpoint. Each problem is one line naming the
    file or option. Returns the tasks as read (cotrain.load_tasks), None without tasks."""
    t = cfg.train
    tasks = load_tasks(cfg) if cfg.tasks else None
    _check_packs(cfg.data.train, "data.train", "train", cfg.model.conservation)
    if cfg.data.val is not None and t.eval_batches:
        _check_packs(cfg.data.val, "data.val", "val", cfg.model.conservation)
    _check_writable(cfg.out_dir, "out_dir")
    if cfg.checkpoint.dir:
        root = _check_writable(cfg.checkpoint.dir, "checkpoint.dir")
        n, need = checkpoint_bytes(cfg.model)
        free = shutil.disk_usage(root).free
        if free < need:
            raise ValueError(f"checkpoint.dir: {root} has {size_text(free)} free, one checkpoint needs about "
                             f"{size_text(need)} ({n:,} parameters x 4 bytes x (1 + 2 Adam states)); free some "
                             "space or use another checkpoint.dir")
    return tasks
