"""Writing a checkpoint: every file into a temporary folder, sizes and sha256 into meta.json,
then one rename into place (`commit`) and `latest` updated; a failed save leaves nothing."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from launch.checkpoint.io import (
    FORMAT,
    META,
    STATE,
    VERSION,
    CheckpointError,
    oneline,
    rng_file,
    rng_state_tensors,
    shard_file,
    step_name,
    write_json,
    write_tensors,
    write_text_atomic,
)
from launch.checkpoint.pruning import prune, remove_checkpoint


def new_folder(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (rank 0 only; see commit)."""
    tmp = root / f"{step_name(step)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_shards(folder: Path, tp: int, pp: int, model: dict[str, torch.Tensor],
                 optim: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """One (tp, pp) slot's model tensors and, if any, its optimizer states. Returns the
    file_record of each file written (by name), for write_meta."""
    written = {}
    name = shard_file("model", tp, pp)
    written[name] = write_tensors(folder / name, model, metadata={"format": FORMAT})
    if optim:
        name = shard_file("optim", tp, pp)
        written[name] = write_tensors(folder / name, optim)
    return written


def write_meta(folder: Path, meta: dict, *, files: dict[str, dict]) -> None:
    """meta.json: the format tag, the caller's fields (JSON values only) and `files`: the size
    and sha256 of every other file of the checkpoint (what write_tensors returned)."""
    fields = {k: v for k, v in meta.items() if k not in ("format", "version", "files")}
    write_json(folder / META, {"format": FORMAT, "version": VERSION, **fields, "files": dict(sorted(files.items()))})


def commit(tmp: Path, root: Path, step: int, keep: int | None = None) -> Path:
    """Rename a finished temporary folder into `root/step_N`, point `latest` at it, and keep
    the newest `keep` checkpoints up to this one (None: all). Rank 0 only, after every rank
    has written."""
    final = root / step_name(step)
    replaced = None
    if final.exists() or final.is_symlink():  # the same step saved again: the new one replaces it
        replaced = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.replace(final, replaced)
    try:
        os.replace(tmp, final)
    except BaseException:
        if replaced is not None:
            os.replace(replaced, final)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    if replaced is not None:
        remove_checkpoint(replaced)
    if keep:
        prune(root, keep, step)
    return final


def _first_error(error: str | None) -> tuple[int, str] | None:
    """(rank, message) of the first rank that reports an error, the same on every rank."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next(((r, e) for r, e in enumerate(errors) if e), None)


def save_checkpoint(root: str | Path, step: int, pm, opt, meta: dict, keep: int, *,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. `tensors`: run-level
    tensors (the same on every rank) saved to state.safetensors by rank 0.

    Every file is written into a temporary folder; its size and sha256 go into meta.json. If
    any rank fails to write (a full disk...), the temporary folder is removed, `latest` and
    the previous checkpoints are untouched, and every rank raises one CheckpointError."""
    root = Path(root)
    rank = dist.get_rank()
    what = f"saving checkpoint {step_name(step)} in {root} failed"
    tmp_name, error = None, None
    if rank == 0:
        try:
            tmp_name = new_folder(root, step).name
        except OSError as e:
            error = _why(e)
    agreed = [tmp_name, error]
    dist.broadcast_object_list(agreed, src=0)
    tmp_name, error = agreed
    if error:
        raise CheckpointError(f"{what}: {error}")
    tmp = root / tmp_name
    try:
        return _save_into(tmp, root, step, pm, opt, meta, keep, tensors, what)
    except BaseException:  # anything else (a bug, an interrupt): never leave the temporary folder
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _why(e: OSError) -> str:
    """A failed write in one line, naming the file: 'FILE: No space left on device (ENOSPC)'."""
    if e.errno is not None and e.strerror:
        code = errno.errorcode.get(e.errno, str(e.errno))
        return f"{e.filename}: {e.strerror} ({code})" if e.filename else f"{e.strerror} ({code})"
    return oneline(e)


def _save_into(tmp: Path, root: Path, step: int, pm, opt, meta: dict, keep: int,
               tensors: dict[str, torch.Tensor] | None, what: str) -> Path:
    rank = dist.get_rank()
    error = None

    # Collectives under ZeRO (states are gathered over data parallel): every rank joins.
    master = opt.master_params()
    states = opt.state_tensors()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    written: dict[str, dict] = {}
    try:
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            model_state = master if master is not None else {n: p.detach() for n, p in pm.named_parameters()}
            # Persistent buffers too (the entropy patcher's adapted threshold): the same on every TP rank.
            written.update(write_shards(tmp, tp, pp, {**model_state, **dict(pm.named_persistent_buffers())}, states))
        written[rng_file(rank)] = write_tensors(tmp / rng_file(rank), rng_state_tensors())
    except OSError as e:
        error = _why(e)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, written)
    failed = _first_error(error)
    final = root / step_name(step)
    if rank == 0 and failed is None:
        try:
            files = {name: rec for part in records for name, rec in part.items()}
            if tensors:
                files[STATE] = write_tensors(tmp / STATE, tensors)
            steps = opt.adam_steps()
            adam_step = max(steps.values(), default=0)
            write_meta(tmp, {"step": step, "adam_step": adam_step,
                             "adam_steps": {n: s for n, s in steps.items() if s != adam_step}, **meta}, files=files)
            commit(tmp, root, step, keep)
        except OSError as e:
            error = _why(e)
    if failed is None:
        agreed = [error]
        dist.broadcast_object_list(agreed, src=0)
        failed = (0, agreed[0]) if agreed[0] else None
    if failed is not None:
        tail = "nothing of it was kept; the previous checkpoints and `latest` are as they were"
        if rank == 0:
            if not tmp.exists() and final.is_dir():  # renamed into place; `latest` or pruning failed
                tail = f"{final.name} itself is complete"
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        r, msg = failed
        on = f" (rank {r})" if dist.get_world_size() > 1 else ""
        raise CheckpointError(f"{what}{on}: {msg}; {tail}")
    dist.barrier()
    return final
