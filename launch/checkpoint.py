"""Distributed checkpoints that any layout can read, for pretraining and fine-tuning.

    CKPT_DIR/
      latest                         the name of the newest complete checkpoint
      step_00000100/
        meta.json                    step, layout, configs, loader state, Adam step(s), metrics
                                     (and whatever else the trainer adds: JSON only)
        model-tp00-pp00.safetensors  canonical (single-device) names, this TP rank's slice
                                     (parameters and persistent buffers),
        optim-tp00-pp00.safetensors  'exp_avg/<name>', 'exp_avg_sq/<name>' (same slicing)
        rng-rank00000.safetensors    each rank's RNG states (uint8 tensors)
        state.safetensors            run-level tensors the trainer adds, the same on every
                                     rank (fine-tuning: its batch-order generators)

No pickle anywhere: tensors are safetensors, everything else JSON, and nothing here (or in
the trainers) calls `torch.load`. A file that is not what its name says is refused with a
one-line ValueError; files of an older format (`rng-rank*.pt`) are ignored, never read.
The primitives for that (atomic JSON / tensor writes, checked reads, RNG state as
tensors) live here and are used by both trainers and by `hyena-glt reshard`.

Tensors are keyed by the single-device parameter name (global layer indices) and sliced
only along tensor parallelism; optimizer states are full over data parallelism whatever
the ZeRO stage. Loading therefore works under any tp/cp/pp/dp and ZeRO stage: each rank
reads the TP slices it needs, concatenates and re-slices. Writes go to a temporary folder
renamed into place only when every rank has finished, so a crash mid-save never damages
the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_adapters.sharding import tp_concat, tp_slice
from megatron_adapters.zero import is_zero3_partitioned

FORMAT = "hyena-glt-distributed-checkpoint"
VERSION = 1
META = "meta.json"
STATE = "state.safetensors"


# ---------------------------------------------------------------- primitives (no pickle)
def _tmp_sibling(path: Path) -> Path:
    return path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    """JSON, written atomically (floats round-trip exactly)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically (contiguous CPU copies of the tensors)."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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


def shard_file(kind: str, tp: int, pp: int) -> str:
    return f"{kind}-tp{tp:02d}-pp{pp:02d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.safetensors"


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / META).is_file():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


# ---------------------------------------------------------------- the writer
def new_folder(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (rank 0 only; see commit)."""
    tmp = root / f"{step_name(step)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_shards(folder: Path, tp: int, pp: int, model: dict[str, torch.Tensor],
                 optim: dict[str, torch.Tensor] | None = None) -> None:
    """One (tp, pp) slot's model tensors and, if any, its optimizer states."""
    write_tensors(folder / shard_file("model", tp, pp), model, metadata={"format": FORMAT})
    if optim:
        write_tensors(folder / shard_file("optim", tp, pp), optim)


def write_meta(folder: Path, meta: dict) -> None:
    """meta.json: the format tag, then the caller's fields (JSON values only)."""
    write_json(folder / META, {"format": FORMAT, "version": VERSION, **meta})


def commit(tmp: Path, root: Path, step: int, keep: int | None = None) -> Path:
    """Rename a finished temporary folder into `root/step_N`, point `latest` at it, and keep
    the newest `keep` checkpoints (None: all). Rank 0 only, after every rank has written."""
    final = root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    if keep:
        _prune(root, keep)
    return final


def save_checkpoint(root: str | Path, step: int, pm, opt, meta: dict, keep: int, *,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. `tensors`: run-level
    tensors (the same on every rank) saved to state.safetensors by rank 0."""
    root = Path(root)
    rank = dist.get_rank()
    tmp_name = [new_folder(root, step).name if rank == 0 else None]
    dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    dist.barrier()

    # Collectives under ZeRO (states are gathered over data parallel): every rank joins.
    master = opt.master_params()
    states = opt.state_tensors()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        model_state = master if master is not None else {n: p.detach() for n, p in pm.named_parameters()}
        # Persistent buffers too (the entropy patcher's adapted threshold): the same on every TP rank.
        write_shards(tmp, tp, pp, {**model_state, **dict(pm.named_persistent_buffers())}, states)
    write_tensors(tmp / rng_file(rank), rng_state_tensors())
    dist.barrier()
    final = root / step_name(step)
    if rank == 0:
        if tensors:
            write_tensors(tmp / STATE, tensors)
        steps = opt.adam_steps()
        adam_step = max(steps.values(), default=0)
        write_meta(tmp, {"step": step, "adam_step": adam_step,
                         "adam_steps": {n: s for n, s in steps.items() if s != adam_step}, **meta})
        commit(tmp, root, step, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- readers
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
            raise KeyError(f"{self.path}: tensor {key} is missing or incomplete ({len(files or {})}/{self.tp} TP slices)")
        shards = []
        for t in range(self.tp):
            with open_tensors(files[t]) as h:
                shards.append(h.get_tensor(key))
        return tp_concat(name_for_rule or key, shards)

    def local(self, key: str, name: str, tp_rank: int, tp: int) -> torch.Tensor:
        return tp_slice(name, self.full(key, name), tp_rank, tp)


@torch.no_grad()
def load_checkpoint(path: str | Path, pm, opt) -> dict:
    """Load into this rank's model shard and optimizer, whatever layout wrote `path`; this
    rank's RNG states too when the checkpoint was written by as many processes. Returns meta."""
    path = Path(path)
    meta = read_meta(path)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    model = ShardReader(path, "model")
    local = {}
    for name, p in pm.named_parameters():
        if name not in model.where:
            raise KeyError(f"{path}: no tensor for parameter {name}")
        local[name] = model.local(name, name, tp_rank, tp)
        if tuple(local[name].shape) != tuple(p.shape) and not is_zero3_partitioned(p):
            raise ValueError(f"{path}: {name} resharded to {tuple(local[name].shape)}, model holds {tuple(p.shape)}")
    for name, p in pm.named_parameters():
        if not is_zero3_partitioned(p):  # ZeRO-3 partitions are set through the optimizer below
            p.copy_(local[name].to(p.dtype))
    for name, b in pm.named_persistent_buffers():
        if name not in model.where:
            raise KeyError(f"{path}: no tensor for buffer {name}")
        b.copy_(model.full(name).to(b.dtype))
    opt.load_master_params(local)
    if any(path.glob("optim-tp*-pp*.safetensors")):
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
