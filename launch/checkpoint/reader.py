"""Reading checkpoints: meta.json, verification against the recorded sizes and sha256
(newest intact first), and loading any layout's shards into this rank's model and optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from launch.checkpoint.io import (
    FORMAT,
    META,
    STATE,
    CheckpointError,
    file_record,
    oneline,
    open_tensors,
    read_json,
    read_tensors,
    rng_file,
    set_rng_state_tensors,
    step_of,
)
from megatron_adapters.deepspeed_zero import is_zero3_partitioned
from megatron_adapters.sharding import tp_concat, tp_slice


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json, checked to be ours."""
    path = Path(path)
    meta = read_json(path / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a hyena-glt distributed checkpoint")
    return meta


def read_state_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The run-level tensors save_checkpoint(tensors=...) stored ({} if none)."""
    f = Path(path) / STATE
    return read_tensors(f) if f.is_file() else {}


@dataclass
class Problem:
    """One thing wrong with a checkpoint: the file and why."""

    file: Path
    reason: str
    kind: str = "damaged"  # "missing" for a recorded file that is not there

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def check_checkpoint(path: str | Path, kinds: tuple[str, ...] | None = None, part: tuple[int, int] = (0, 1)) -> list[Problem]:
    """What is wrong with the checkpoint folder `path` ([] if nothing): meta.json missing,
    unreadable or not ours, a step that differs from the folder name's, and each file meta.json
    records (only names starting with one of `kinds`, e.g. ("model",), if given) missing or of
    another size or sha256. `part=(i, n)`: check only every n-th recorded file from the i-th
    (ranks share the hashing; every part checks meta.json). A checkpoint written before files
    were recorded has nothing to verify them by: only its meta.json is checked."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        return [Problem(meta_file, "missing", "missing")]
    try:
        meta = read_meta(path)
    except (ValueError, OSError) as e:
        return [Problem(meta_file, oneline(e).replace(f"{meta_file}: ", "").replace(f"{path}: ", ""))]
    n = step_of(path)
    if n is not None and meta.get("step") != n:
        return [Problem(meta_file, f"records step {meta.get('step')}, but the folder is step {n}")]
    files = meta.get("files")
    if not isinstance(files, dict):
        return []
    names = sorted(k for k in files if kinds is None or k.startswith(kinds))
    problems = []
    for i, name in enumerate(names):
        if i % part[1] != part[0]:
            continue
        f, want = path / name, files[name]
        if not f.is_file():
            problems.append(Problem(f, "missing", "missing"))
            continue
        size = f.stat().st_size
        if size != want.get("size"):
            problems.append(Problem(f, f"{size} bytes, but meta.json records {want.get('size')} (truncated or replaced)"))
        elif file_record(f)["sha256"] != want.get("sha256"):
            problems.append(Problem(f, "its sha256 differs from the one meta.json records (the file is damaged)"))
    return problems


def missing_optimizer_files(path: str | Path) -> list[Path]:
    """The optimizer-state files this checkpoint should hold (one per model shard) and does not."""
    path = Path(path)
    try:
        files = read_meta(path).get("files")
    except (ValueError, OSError):
        files = None
    names = list(files) if isinstance(files, dict) else [p.name for p in path.glob("model-tp*-pp*.safetensors")]
    want = [n.replace("model-", "optim-", 1) for n in names if n.startswith("model-")]
    return [path / n for n in sorted(want) if not (path / n).is_file()]


def describe(problems: list[Problem]) -> str:
    return str(problems[0]) + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def find_intact(candidates: list[Path], check=check_checkpoint) -> tuple[Path | None, list[tuple[Path, list[Problem]]]]:
    """The first of `candidates` (give them newest first) for which `check` finds no problem,
    and the ones before it with their problems."""
    damaged = []
    for path in candidates:
        problems = check(path)
        if not problems:
            return path, damaged
        damaged.append((path, problems))
    return None, damaged


def damage_report(damaged: list[tuple[Path, list[Problem]]]) -> str:
    return "; ".join(f"{p.name} is damaged ({describe(probs)})" for p, probs in damaged)


class ShardReader:
    """Reads canonical tensors of a checkpoint written under any TP/PP layout."""

    def __init__(self, path: str | Path, kind: str = "model"):
        self.path = Path(path)
        self.tp = read_meta(self.path)["layout"]["tp"]
        self.where: dict[str, dict[int, Path]] = {}
        for f in sorted(self.path.glob(f"{kind}-tp*-pp*.safetensors")):
            t = int(f.name.split("-tp")[1][:2])
            with open_tensors(f) as h:
                for key in h.keys():
                    self.where.setdefault(key, {})[t] = f

    def keys(self) -> list[str]:
        return sorted(self.where)

    def full(self, key: str, name_for_rule: str | None = None) -> torch.Tensor:
        files = self.where.get(key)
        if not files or len(files) != self.tp:
            raise CheckpointError(f"{self.path}: tensor {key} is missing or incomplete "
                                  f"({len(files or {})}/{self.tp} TP slices)")
        shards = []
        for t in range(self.tp):
            with open_tensors(files[t]) as h:
                shards.append(h.get_tensor(key))
        return tp_concat(name_for_rule or key, shards)

    def local(self, key: str, name: str, tp_rank: int, tp: int) -> torch.Tensor:
        return tp_slice(name, self.full(key, name), tp_rank, tp)


@torch.no_grad()
def set_model_weights(pm, opt, local: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], source: str) -> None:
    """Put this rank's slices `local` (name -> tensor) and the persistent `buffers` into the
    model and the optimizer's master copy (a resume, or a warm start from a model directory)."""
    for name, p in pm.named_parameters():
        if tuple(local[name].shape) != tuple(p.shape) and not is_zero3_partitioned(p):
            raise ValueError(f"{source}: {name} resharded to {tuple(local[name].shape)}, model holds {tuple(p.shape)}")
    for name, p in pm.named_parameters():
        if not is_zero3_partitioned(p):  # ZeRO-3 partitions are set through the optimizer below
            p.copy_(local[name].to(p.dtype))
    for name, b in pm.named_persistent_buffers():
        b.copy_(buffers[name].to(b.dtype))
    opt.load_master_params(local)


@torch.no_grad()
def load_checkpoint(path: str | Path, pm, opt, *, optimizer: bool = True, verified: bool = False) -> dict:
    """Load into this rank's model shard and optimizer, whatever layout wrote `path`; this
    rank's RNG states too when the checkpoint was written by as many processes. Returns meta.

    Unless `verified` (the caller checked it already), the checkpoint is verified first
    (check_checkpoint): any damaged or missing file is one CheckpointError naming it.
    `optimizer=False`: the optimizer states are not read (fresh optimizer state); otherwise a
    missing optimizer-state file is an error."""
    path = Path(path)
    if not verified:
        problems = check_checkpoint(path)
        if problems:
            raise CheckpointError(describe(problems))
    meta = read_meta(path)
    if optimizer:
        missing = missing_optimizer_files(path)
        if missing:
            raise CheckpointError(f"{missing[0]}: missing: this checkpoint holds no optimizer state for these parameters")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    model = ShardReader(path, "model")
    local = {}
    for name, p in pm.named_parameters():
        if name not in model.where:
            raise CheckpointError(f"{path}: no tensor for parameter {name}")
        local[name] = model.local(name, name, tp_rank, tp)
    buffers = {}
    for name, b in pm.named_persistent_buffers():
        if name not in model.where:
            raise CheckpointError(f"{path}: no tensor for buffer {name}")
        buffers[name] = model.full(name)
    set_model_weights(pm, opt, local, buffers, str(path))
    if optimizer:
        optim = ShardReader(path, "optim")
        tensors = {}
        for name, _ in pm.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                k = f"{key}/{name}"
                if k in optim.where:
                    tensors[k] = optim.local(k, name, tp_rank, tp)
        opt.load_state_tensors(tensors, meta["adam_step"], meta.get("adam_steps"))
    rng = path / rng_file(dist.get_rank())
    if rng.is_file() and meta["layout"].get("world_size") == dist.get_world_size():
        set_rng_state_tensors(read_tensors(rng))
    return meta


def full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-device state dict of a checkpoint (TP slices concatenated, stages merged)."""
    reader = ShardReader(path, "model")
    return {name: reader.full(name) for name in reader.keys()}
