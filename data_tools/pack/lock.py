"""Who writes a pack's --out, and what a run finds there when it starts.

* **One run per job.** A job holds `DIR/.pack/LOCK-job-NNNNN` (data_tools/dirlock.py: host,
  PID and start time, taken with O_CREAT|O_EXCL) from before it looks at DIR until it ends.
  The jobs of one pack (a SLURM array's tasks, `--num-jobs/--job-index`) lock different
  files and run together; a second run of a job that is running is refused at once, in one
  line naming the directory, host and PID. Under mpiexec (with mpi4py) rank 0 locks every
  rank's job before the plan is agreed. A lock whose process is gone is taken over (one
  line says so).
* **The start, under the pack's state lock** (`manifest.state_lock`, held for a moment):
  the options are checked against `DIR/.pack/options.json` (another pack's options are
  refused, also when two packs start at the same moment: the first to take the state lock
  writes the file, the other finds it); then `manifest.json` and the job's own manifest are
  removed, since the job is about to change what they describe; a job killed from then on
  leaves no `manifest.json` (loaders and `data stats` refuse the directory, naming the jobs
  that have not finished) and its next run completes the pack.
* **Leftovers.** The temporary files a killed run of the job left (`.SHARD.tar.tmp`,
  `.SHARD.idx.tmp`, a job manifest being written) are removed under its lock; those of the
  shared files (`.manifest.json.PID.tmp`, `.options.json.PID.tmp`) under the state lock.
"""

from __future__ import annotations

from pathlib import Path

from ..dirlock import DirLock
from ..manifest import (
    MANIFEST,
    job_manifest_path,
    remove_shared_temporaries,
    state_dir,
    state_lock,
)
from ..windows import SPLITS
from .options import PackOptions, check_options_file


def job_lock_path(out: Path, job: int) -> Path:
    return state_dir(out) / f"LOCK-job-{job:05d}"


def lock_jobs(out: Path, jobs, num_jobs: int, log) -> list[DirLock]:
    """Take the locks of `jobs` (in order), or refuse (LockError) holding none."""
    locks: list[DirLock] = []
    try:
        for job in jobs:
            name = f"--out {out}" if num_jobs == 1 else f"--out {out} (job {job} of {num_jobs})"
            locks.append(DirLock(out, job_lock_path(out, job), "--out", name).acquire(log))
    except BaseException:
        release(locks)
        raise
    return locks


def release(locks: list[DirLock]) -> None:
    for lock in reversed(locks):
        lock.release()
    locks.clear()


def remove_job_temporaries(out: Path, job: int) -> None:
    """The temporary files of job `job` (its shards, indexes, manifest and completion log
    being written). Only under the job's lock."""
    out = Path(out)
    for split in SPLITS:
        for p in out.glob(f".{split}-{job:05d}-*.tmp"):
            p.unlink(missing_ok=True)
    for p in (*state_dir(out).glob(f".job-{job:05d}.json.*.tmp"), *(state_dir(out) / f"job-{job:05d}").glob(".*.tmp")):
        p.unlink(missing_ok=True)


def start_jobs(opts: PackOptions, jobs, log) -> None:
    """Under the state lock, with the locks of `jobs` held: refuse other options, then remove
    manifest.json, the jobs' manifests and every temporary file a killed run left."""
    out = Path(opts.out)
    with state_lock(out, log):
        check_options_file(out, opts)
        (out / MANIFEST).unlink(missing_ok=True)
        for job in jobs:
            job_manifest_path(out, job).unlink(missing_ok=True)
        remove_shared_temporaries(out)
    for job in jobs:
        remove_job_temporaries(out, job)
