"""`hyena-glt pack` under `mpiexec`: the ranks agree through MPI, not the shared file system.

Two things need agreement. The plan: rank 0 creates --out, locks every rank's job (pack/
lock.py: a run of any of them elsewhere refuses this one, and this one refuses later ones),
checks that it holds no pack made with other options, finds the inputs and reads their sizes, and sends the result to
every rank, once every rank has shown (a digest, gathered to all) that it was started with
the same inputs, --out and options; so no rank can see another directory listing (a file
system that lags) and plan other work. The merged manifest: rank 0 gathers every rank's
job manifest and writes manifest.json, instead of each job looking for the others' job
manifests on disk. A failure reaches the other ranks at the next of these two points: at
the plan every rank stops (the failing one says why, the others exit with status 2 and
say nothing more), at the end rank 0 writes no manifest.json and names the failed jobs.

While a rank waits for the others it sleeps (MPI's blocking calls spin a core, which the
ranks still packing on the same node need). As in any MPI program, every rank must start:
a rank that stops before MPI does (a command-line error given to that rank alone) leaves
the others waiting in MPI's own start-up.

Without mpi4py the launcher's environment still gives rank and size, and the ranks agree
through the file system, as a SLURM array's tasks do.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from .holdout import EmptySplitError
from .manifest import write_merged

_LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class RankFailed(Exception):
    """Another rank failed before the plan was agreed, and printed why; this rank stops too."""


def mpi_job() -> tuple[int, int, MpiRanks | None] | None:
    """(rank, size, the ranks to agree with over MPI, or None without mpi4py) when started
    by mpiexec/mpirun, else None."""
    if not any(v in os.environ for v in _LAUNCHER_VARIABLES):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
            if rank in os.environ and size in os.environ:
                return int(os.environ[rank]), int(os.environ[size]), None
        return None
    ranks = MpiRanks(MPI.COMM_WORLD)
    return ranks.rank, ranks.size, ranks


class MpiRanks:
    """The ranks of one mpiexec run packing one pack, each one job."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def _wait_for_all(self) -> None:
        """Return once every rank got here, sleeping meanwhile (1 ms at first, then up to 50 ms)."""
        request, pause = self.comm.Ibarrier(), 0.001
        while not request.Test():
            time.sleep(pause)
            pause = min(0.05, pause * 2)

    def agree(self, command: bytes, make_plan):
        """Rank 0's `make_plan()`, on every rank, if every rank's `command` (what defines the
        pack: inputs, --out, options) is the same. Disagreement: ValueError on rank 0 (its
        message names the ranks that differ), RankFailed on the others. make_plan failing:
        its exception on rank 0, RankFailed on the others."""
        digests = self.comm.allgather(hashlib.sha256(command).hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            if self.rank == 0:
                raise ValueError(f"MPI rank(s) {', '.join(map(str, differ))} of {self.size} were started with other "
                                 "inputs, --out or options than rank 0; start every rank with the same command")
            raise RankFailed()
        plan, error = None, None
        if self.rank == 0:
            try:
                plan = make_plan()
            except Exception as e:  # noqa: BLE001 - re-raised here once the other ranks know
                error = e
        self._wait_for_all()
        failed, plan = self.comm.bcast((error is not None, plan))
        if error is not None:
            raise error
        if failed:
            raise RankFailed()
        return plan

    def merge(self, out: Path, job_manifest: dict | None, error: str | None) -> tuple[dict | None, list]:
        """Gather every rank's job manifest (None and an error message for a failed job) to
        rank 0, which writes manifest.json (`manifest.write_merged`) if every job succeeded.
        Returns (the merged manifest on rank 0, else None; the failed jobs with their
        errors, on every rank; [(None, why)] when every job succeeded but a split the pack
        was asked for is empty, so manifest.json was not written)."""
        self._wait_for_all()
        gathered = self.comm.gather((job_manifest, error))
        merged, failed = None, None
        if self.rank == 0:
            failed = [(r, err) for r, (_, err) in enumerate(gathered) if err is not None]
            if not failed:
                try:
                    merged = write_merged(out, [m for m, _ in gathered])
                except EmptySplitError as e:  # no job failed: the pack is refused (rank None)
                    failed = [(None, str(e))]
                except ValueError as e:
                    failed = [(0, str(e))]
        return merged, self.comm.bcast(failed)
