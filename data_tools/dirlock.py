"""One run at a time per directory: a lock file holding host, PID and start time; a lock whose
process is gone is taken over.

Used for checkpoint directories and published outputs (launch/checkpoint/lock.py re-exports
it with `CheckpointError` as its error and `LOCK` as its file) and for pack outputs
(data_tools/pack/lock.py, data_tools/manifest.py). It lives here, below `launch`, because
`data_tools` must not import `launch` (tests/test_import_graph.py); it imports nothing of the
project.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK = "LOCK"
_WRITING_S = 2.0  # how long a lock that is not yet readable is taken for one being written


class LockError(ValueError):
    """A directory another run holds (or whose lock cannot be read), said in one line naming
    the directory, the host and the PID (a ValueError: the CLI prints it as one line and exits 2)."""


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
    """One run at a time per directory. The lock file (`ROOT/LOCK` unless `lock_path` names
    another) is created with O_CREAT|O_EXCL (atomic on local and NFSv3+ filesystems) and holds
    the host, PID, process start time, the time it was taken and the SLURM job / attempt. A
    lock left by a process that is gone is taken over (and said so, in one line through
    `log`): same host and the PID no longer runs (or is another process now), or an earlier
    attempt of the same SLURM job (requeue, torchrun restart) on any host. Any other lock
    refuses the run with one line (`error`, a ValueError) naming the directory, host and PID;
    with `acquire(wait=S)` only once it is still held after S seconds (for locks held a moment,
    such as the one merging a pack's manifest).

    `lock_path`, `what`: the same lock for something other than a checkpoint.dir, e.g. an
    output directory that launch/checkpoint/publish.py writes (its lock is the sibling file
    `OUT.LOCK`, since the directory itself is renamed into place); `what` names it in the
    messages, `name` (default "WHAT ROOT") is how they name the locked thing."""

    error: type[Exception] = LockError

    def __init__(self, root: str | Path, lock_path: str | Path | None = None, what: str = "checkpoint.dir",
                 name: str | None = None):
        self.root = Path(root)
        self.path = Path(lock_path) if lock_path is not None else self.root / LOCK
        self.what = what
        self.name = name or f"{what} {self.root}"
        self.info: dict | None = None

    @staticmethod
    def _me() -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
                "attempt": [os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")],
                # torchrun's default --rdzv-id is "none": shared by unrelated runs, so no identity
                "torchrun_run": None if os.environ.get("TORCHELASTIC_RUN_ID", "none") == "none" else os.environ["TORCHELASTIC_RUN_ID"]}

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
        # torchrun --max-restarts: the restarted rank 0 may be on another host than the lost one
        if me["torchrun_run"] and held.get("torchrun_run") == me["torchrun_run"] and held.get("attempt") != me["attempt"]:
            return f"an earlier attempt of torchrun run {me['torchrun_run']}"
        return None

    def _take_over(self, held: dict) -> bool:
        """Remove the stale lock `held`; False if another run replaced it in the meantime."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
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

    def acquire(self, log=print, wait: float = 0.0) -> DirLock:
        """Take the lock (see the class); `wait`: seconds to wait for a live holder to let go
        before refusing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._me()
        now = time.monotonic()
        deadline, unreadable_since, pause, races = now + wait, None, 0.005, 0
        while races < 10:  # a lock gone, or taken over, between two looks: another try
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is False:
                    races += 1
                    continue
                if held is None:
                    # Created but not yet written (O_EXCL, then the JSON) by a run starting
                    # this very moment, or damaged: only the second, if it stays so.
                    now = time.monotonic()
                    unreadable_since = unreadable_since or now
                    if now - unreadable_since < max(_WRITING_S, wait):
                        time.sleep(0.01)
                        continue
                    raise self.error(f"{self.name}: its lock {self.path} is unreadable; if no run uses it, delete "
                                     f"{self.path} and start again") from None
                unreadable_since = None
                why = self._stale(held, me)
                if why is None:
                    if time.monotonic() < deadline:
                        time.sleep(pause)
                        pause = min(0.1, pause * 2)
                        continue
                    who = f"host {held['host']}, PID {held['pid']}, started {held.get('started', '?')}"
                    if held["host"] == me["host"]:
                        raise self.error(f"{self.name} is in use by another run ({who}); wait for it to end, or use "
                                         f"another {self.what}") from None
                    raise self.error(f"{self.name} is locked by a run on another host ({who}); if that run is "
                                     f"really gone, delete {self.path} and start again") from None
                if self._take_over(held):
                    log(f"{self.name}: took over the stale lock of PID {held['pid']} on {held['host']} (started "
                        f"{held.get('started', '?')}): {why}")
                races += 1
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
        raise self.error(f"{self.name}: could not take {self.path} (other runs keep taking it)")

    def release(self) -> None:
        """Remove the lock if it is still this one (idempotent)."""
        if self.info is not None and self._read() == self.info:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
