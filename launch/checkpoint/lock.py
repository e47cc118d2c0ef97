"""One run per checkpoint (or output) directory: a LOCK file holding host, PID and start time;
a lock whose process is gone is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from launch.checkpoint.io import LOCK, CheckpointError


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

    def acquire(self, log=print) -> DirLock:
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
