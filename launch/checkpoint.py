"""Distributed checkpoints that any layout can read.

    CKPT_DIR/
      latest                         the name of the newest complete checkpoint
      step_00000100/
        meta.json                    step, layout, configs, loader state, Adam step, metrics
        model-tp00-pp00.safetensors  canonical (single-device) names, this TP rank's slice
                                     (parameters and persistent buffers),
        optim-tp00-pp00.safetensors  'exp_avg/<name>', 'exp_avg_sq/<name>' (same slicing)
        rng-rank00000.pt             each rank's RNG states

Tensors are keyed by the single-device parameter name (global layer indices) and sliced
only along tensor parallelism; optimizer states are full over data parallelism whatever
the ZeRO stage. Loading therefore works under any tp/cp/pp/dp and ZeRO stage: each rank
reads the TP slices it needs, concatenates and re-slices. Writes go to a temporary folder
renamed into place only when every rank has finished, so a crash mid-save never damages
the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_adapters.sharding import tp_concat, tp_slice

FORMAT = "hyena-glt-distributed-checkpoint"
VERSION = 1


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _shard_file(kind: str, tp: int, pp: int) -> str:
    return f"{kind}-tp{tp:02d}-pp{pp:02d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, pm, opt, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / step_name(step)
    tmp_name = [f"{step_name(step)}.{uuid.uuid4().hex[:8]}.tmp" if rank == 0 else None]
    dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # Collectives under ZeRO (states are gathered over data parallel): every rank joins.
    master = opt.master_params()
    states = opt.state_tensors()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    writer = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    if writer:
        model_state = master if master is not None else {n: p.detach().cpu() for n, p in pm.named_parameters()}
        # Persistent buffers too (the entropy patcher's adapted threshold): the same on every TP rank.
        model_state = {**model_state, **dict(pm.named_persistent_buffers())}
        model_state = {n: t.contiguous().cpu() for n, t in model_state.items()}
        save_file(model_state, str(tmp / _shard_file("model", tp, pp)), metadata={"format": FORMAT})
        if states:
            save_file({k: v.contiguous() for k, v in states.items()}, str(tmp / _shard_file("optim", tp, pp)))
    torch.save(_rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        full_meta = {"format": FORMAT, "version": VERSION, "step": step, "adam_step": opt.adam_step(), **meta}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


class ShardReader:
    """Reads canonical tensors of a checkpoint written under any TP/PP layout."""

    def __init__(self, path: str | Path, kind: str = "model"):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.tp = meta["layout"]["tp"]
        self.where: dict[str, dict[int, Path]] = {}
        for f in sorted(self.path.glob(f"{kind}-tp*-pp*.safetensors")):
            t = int(f.name.split("-tp")[1][:2])
            with safe_open(str(f), "pt") as h:
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
            with safe_open(str(files[t]), "pt") as h:
                shards.append(h.get_tensor(key))
        return tp_concat(name_for_rule or key, shards)

    def local(self, key: str, name: str, tp_rank: int, tp: int) -> torch.Tensor:
        return tp_slice(name, self.full(key, name), tp_rank, tp)


@torch.no_grad()
def load_checkpoint(path: str | Path, pm, opt) -> dict:
    """Load into this rank's model shard and optimizer, whatever layout wrote `path`."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a hyena-glt distributed checkpoint")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    model = ShardReader(path, "model")
    local = {}
    for name, p in pm.named_parameters():
        if name not in model.where:
            raise KeyError(f"{path}: no tensor for parameter {name}")
        local[name] = model.local(name, name, tp_rank, tp)
        if tuple(local[name].shape) != tuple(p.shape) and not hasattr(p, "ds_id"):
            raise ValueError(f"{path}: {name} resharded to {tuple(local[name].shape)}, model holds {tuple(p.shape)}")
    for name, p in pm.named_parameters():
        if not hasattr(p, "ds_id"):  # ZeRO-3 partitions are set through the optimizer below
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
        opt.load_state_tensors(tensors, meta["adam_step"])
    rng = path / f"rng-rank{dist.get_rank():05d}.pt"
    same_world = meta["layout"].get("world_size") == dist.get_world_size()
    if rng.is_file() and same_world:
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-device state dict of a checkpoint (TP slices concatenated, stages merged)."""
    reader = ShardReader(path, "model")
    return {name: reader.full(name) for name in reader.keys()}
