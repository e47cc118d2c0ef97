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

Trust (docs/checkpoints.md):
  * meta.json's "files" records the size and sha256 of every other file of the checkpoint,
    computed by the writer (write_tensors, used by save_checkpoint and `hyena-glt reshard`);
    check_checkpoint / find_intact verify them, newest first, and say why a checkpoint is
    skipped. Checkpoints are ordered by the step number in their name, never by the name.
  * DirLock: one run per checkpoint.dir (a LOCK file holding host, PID and start time).
  * Pruning never deletes a checkpoint newer than the one just saved; a failed save removes
    its temporary folder and leaves `latest` and the previous checkpoint as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
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
LOCK = "LOCK"
# Test-only: seconds to sleep after each file a save writes, so that a test can kill a run in
# the middle of a save (tests/test_checkpoint_trust.py). Read in one place: _test_save_delay.
SAVE_DELAY_ENV = "HYENA_GLT_TEST_SAVE_DELAY"
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written, said in one line naming the file or folder
    (a ValueError: the CLI prints it as one line and exits 2)."""


def _oneline(e: BaseException) -> str:
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


def file_record(path: str | Path) -> dict:
    """{"size", "sha256"} of a file (what meta.json records for every file of a checkpoint)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """A safetensors file, written atomically (contiguous CPU copies of the tensors). Returns
    its file_record (size and sha256 of what is on disk)."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        record = file_record(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


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


# ---------------------------------------------------------------- the lock of a checkpoint dir
def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no psutil, no such process, no access
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        return True
    except Exception:  # gone in between
        return False


class DirLock:
    """One run at a time per checkpoint.dir. `LOCK` is created with O_CREAT|O_EXCL (atomic on
    local and NFSv3+ filesystems) by rank 0 and holds its host, PID, process start time, the
    time it was taken and the SLURM job / attempt. A lock left by a process that is gone is
    taken over (and said so): same host and the PID no longer runs (or is another process
    now), or an earlier attempt of the same SLURM job (requeue, torchrun restart) on any host.
    Any other lock refuses the run with one line naming the dir, host and PID."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK
        self.info: dict | None = None

    @staticmethod
    def _me() -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
                "attempt": [os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")]}

    def _read(self, path: Path | None = None):
        """The lock's JSON, None if it is unreadable, False if it is gone."""
        try:
            data = json.loads((path or self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and "pid" in data and "host" in data else None

    @staticmethod
    def _stale(held: dict, me: dict) -> str | None:
        """Why `held` belongs to a run that is gone, or None if it may still be running."""
        if held["host"] == me["host"]:
            pid, started = held["pid"], held.get("pid_started")
            if pid == me["pid"] and started == me["pid_started"]:
                return "taken earlier by this same process"
            if not isinstance(pid, int) or not _alive(pid):
                return f"PID {pid} is not running"
            now = _process_start(pid)
            if now is not None and started is not None and abs(now - started) > 1.0:
                return f"PID {pid} is another process now"
            return None
        if me["slurm_job"] and held.get("slurm_job") == me["slurm_job"] and held.get("attempt") != me["attempt"]:
            return f"an earlier attempt of SLURM job {me['slurm_job']}"
        return None

    def _take_over(self, held: dict) -> bool:
        """Remove the stale lock `held`; False if another run replaced it in the meantime."""
        aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        if self._read(aside) != held:  # a fresh lock of another run: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def acquire(self, log=print) -> "DirLock":
        self.root.mkdir(parents=True, exist_ok=True)
        me = self._me()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is False:
                    continue
                if held is None:
                    raise CheckpointError(f"checkpoint.dir {self.root}: its lock {self.path} is unreadable; if no run "
                                          f"uses this directory, delete {self.path} and start again") from None
                why = self._stale(held, me)
                if why is None:
                    who = f"host {held['host']}, PID {held['pid']}, started {held.get('started', '?')}"
                    if held["host"] == me["host"]:
                        raise CheckpointError(f"checkpoint.dir {self.root} is in use by another run ({who}); wait for "
                                              "it to end, or use another checkpoint.dir") from None
                    raise CheckpointError(f"checkpoint.dir {self.root} is locked by a run on another host ({who}); if "
                                          f"that run is really gone, delete {self.path} and start again") from None
                if self._take_over(held):
                    log(f"checkpoint.dir {self.root}: took over the stale lock of PID {held['pid']} on "
                        f"{held['host']} (started {held.get('started', '?')}): {why}")
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            self.info = me
            return self
        raise CheckpointError(f"checkpoint.dir {self.root}: could not take {self.path} (other runs keep taking it)")

    def release(self) -> None:
        """Remove the lock if it is still this one (idempotent)."""
        if self.info is not None and self._read() == self.info:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None


# ---------------------------------------------------------------- the writer
def _test_save_delay() -> None:
    """Test-only hook (HYENA_GLT_TEST_SAVE_DELAY=seconds, unset in real runs): sleep after each
    file a save writes, so that a test can SIGKILL a run in the middle of a save."""
    delay = os.environ.get(SAVE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def new_folder(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (rank 0 only; see commit)."""
    tmp = root / f"{step_name(step)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_shards(folder: Path, tp: int, pp: int, model: dict[str, torch.Tensor],
                 optim: dict[str, torch.Tensor] | None = None, after_each=None) -> dict[str, dict]:
    """One (tp, pp) slot's model tensors and, if any, its optimizer states. Returns the
    file_record of each file written (by name), for write_meta."""
    written = {}
    name = shard_file("model", tp, pp)
    written[name] = write_tensors(folder / name, model, metadata={"format": FORMAT})
    if after_each:
        after_each()
    if optim:
        name = shard_file("optim", tp, pp)
        written[name] = write_tensors(folder / name, optim)
        if after_each:
            after_each()
    return written


def write_meta(folder: Path, meta: dict, *, files: dict[str, dict]) -> None:
    """meta.json: the format tag, the caller's fields (JSON values only) and `files`: the size
    and sha256 of every other file of the checkpoint (what write_tensors returned)."""
    fields = {k: v for k, v in meta.items() if k not in ("format", "version", "files")}
    write_json(folder / META, {"format": FORMAT, "version": VERSION, **fields, "files": dict(sorted(files.items()))})


def _remove_checkpoint(path: Path) -> None:
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
        _remove_checkpoint(replaced)
    if keep:
        _prune(root, keep, step)
    return final


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints by step number among those up to `step` (the one just
    saved); never one newer than it."""
    done = [p for p in step_dirs(root) if step_of(p) <= step]
    for old in done[:-keep]:
        _remove_checkpoint(old)


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
            error = _oneline(e)
    agreed = [tmp_name, error]
    dist.broadcast_object_list(agreed, src=0)
    tmp_name, error = agreed
    if error:
        raise CheckpointError(f"{what}: {error}")
    tmp = root / tmp_name

    # Collectives under ZeRO (states are gathered over data parallel): every rank joins.
    master = opt.master_params()
    states = opt.state_tensors()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    written: dict[str, dict] = {}
    try:
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            model_state = master if master is not None else {n: p.detach() for n, p in pm.named_parameters()}
            # Persistent buffers too (the entropy patcher's adapted threshold): the same on every TP rank.
            written.update(write_shards(tmp, tp, pp, {**model_state, **dict(pm.named_persistent_buffers())}, states,
                                        after_each=_test_save_delay))
        written[rng_file(rank)] = write_tensors(tmp / rng_file(rank), rng_state_tensors())
        _test_save_delay()
    except OSError as e:
        error = _oneline(e)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, written)
    failed = _first_error(error)
    final = root / step_name(step)
    if rank == 0 and failed is None:
        try:
            files = {name: rec for part in records for name, rec in part.items()}
            if tensors:
                files[STATE] = write_tensors(tmp / STATE, tensors)
                _test_save_delay()
            steps = opt.adam_steps()
            adam_step = max(steps.values(), default=0)
            write_meta(tmp, {"step": step, "adam_step": adam_step,
                             "adam_steps": {n: s for n, s in steps.items() if s != adam_step}, **meta}, files=files)
            _test_save_delay()
            commit(tmp, root, step, keep)
        except OSError as e:
            error = _oneline(e)
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


# ---------------------------------------------------------------- readers and verification
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
        return [Problem(meta_file, _oneline(e).replace(f"{meta_file}: ", "").replace(f"{path}: ", ""))]
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
