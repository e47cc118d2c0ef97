"""Checkpoint primitives, no pickle: atomic JSON and tensor writes with their size and sha256,
checked reads, RNG state as tensors, and the names of a checkpoint's folders and files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hyena_glt.checksums import file_record, write_safetensors  # noqa: F401  (file_record: re-exported)

FORMAT = "hyena-glt-distributed-checkpoint"
VERSION = 1
META = "meta.json"
STATE = "state.safetensors"
LOCK = "LOCK"
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written, said in one line naming the file or folder
    (a ValueError: the CLI prints it as one line and exits 2)."""


def oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------- primitives (no pickle)
def _tmp_sibling(path: Path) -> Path:
    return path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """JSON, written atomically (floats round-trip exactly)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """A safetensors file, written atomically (contiguous CPU copies of the tensors). Returns
    its file_record (size and sha256 of what is on disk). A failed write (a full disk: an
    OSError, or safetensors' own SafetensorError) leaves no temporary file and raises an
    OSError naming `path` and the cause (hyena_glt.checksums.write_safetensors)."""
    return write_safetensors(path, tensors, metadata)


@contextlib.contextmanager
def open_tensors(path: str | Path):
    """safe_open, with a one-line ValueError for a file that is not safetensors."""
    try:
        handle = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file ({str(e).strip().splitlines()[0]})") from None
    with handle as h:
        yield h


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    with open_tensors(path) as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and CUDA if present) as uint8 tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state_tensors(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- layout of a checkpoint
def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step number of a `step_N` folder name (any padding), None for anything else
    (`step_N.<x>.tmp`, `step_N.damaged`, files)."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_dirs(root: str | Path) -> list[Path]:
    """The `step_N` folders of a checkpoint dir, finished or not, oldest first BY STEP NUMBER
    (names do not sort as numbers: step_100000000 < step_99999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(p), p.name, p) for p in root.iterdir() if step_of(p) is not None and p.is_dir()]
    return [p for _, _, p in sorted(found)]


def shard_file(kind: str, tp: int, pp: int) -> str:
    return f"{kind}-tp{tp:02d}-pp{pp:02d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.safetensors"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint (by step number) that has a meta.json; not verified (see
    find_intact for that)."""
    done = [p for p in step_dirs(root) if (p / META).is_file()]
    return done[-1] if done else None
