"""One pack job, start to end: its inputs planned (under mpiexec rank 0 plans for every rank),
its files packed (in this process, or by workers), resuming what an earlier run completed,
its job manifest written and the pack's manifest merged (`pack_job`; `run_pack` is the
command's exit code)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..fasta import BadInputError, discover_inputs, estimate_bases
from ..holdout import (
    EmptySplitError,
    Regions,
    asked_splits,
    empty_splits,
    job_holdout,
    region_warnings,
)
from ..manifest import dumps, state_dir, try_finalize, write_job_manifest
from ..mpi import MpiRanks, RankFailed
from ..progress import Progress
from ..shards import CompletionLog, ResumeMismatch, ShardIO, sha256_file
from ..tracks import Tracks
from ..windows import SPLITS, assign_files
from .books import JobBooks
from .file_pass import FilePass, Handover, PackContext, SkipFile
from .lock import lock_jobs, release, remove_job_temporaries, start_jobs
from .options import PackOptions
from .workers import pack_with_workers, start_workers, stop_workers


@dataclass
class JobResult:
    exit_code: int
    job_manifest: dict
    manifest: dict | None  # the merged manifest, if this job wrote it
    skipped: list[str] = field(default_factory=list)


def _remove_stale(out: Path, job: int, keep: set[str]) -> None:
    """Shards of this job that the current plan does not have (the inputs changed since an
    earlier run), and temporary files left behind (by a killed run: removed at the start)."""
    for split in SPLITS:
        for p in out.glob(f"{split}-{job:05d}-*"):
            if p.name.rsplit(".", 1)[0] not in keep:
                p.unlink()
    remove_job_temporaries(out, job)


def _pack_inline(ctx: PackContext, mine: list[int], job: JobBooks) -> None:
    """One process: every file planned and written record by record. Shards continued
    from one file to the next stay open, so every tar is written in order and hashed as
    it is written."""
    state = Handover.start(ctx.opts.num_jobs)
    shard_io = ShardIO(ctx.out)
    try:
        for pos, i in enumerate(mine):
            file_pass = FilePass(ctx, i, shard_io, job.progress.update)
            for shard, entry in file_pass.pack(state, lambda s, plan: job.planned(pos, plan)):
                job.completed(shard, entry)
            for shard in job.wrote(pos):
                job.completed(shard, shard_io.commit(shard))
        job.close(s for s in state.open.values() if s is not None)
        for shard in job.take_ready():
            job.completed(shard, shard_io.commit(shard))
    finally:
        shard_io.discard()


def _plan_inputs(opts: PackOptions, jobs, locks: list) -> tuple[list[Path], list[dict], Tracks | None, Regions | None]:
    """The inputs, what the job manifests record of them (path, size, mtime), the
    conservation tracks and the --val-regions, once the options are checked, --out exists,
    `jobs` are locked (their locks added to `locks`) and started (lock.py: other options are
    refused, manifest.json and the jobs' manifests removed, leftovers of killed runs too).
    Under mpiexec rank 0 makes this for every rank, and locks every rank's job."""
    opts.validate()
    files = discover_inputs(opts.inputs)
    tracks = Tracks(opts.conservation) if opts.conservation else None
    regions = Regions(opts.val_regions) if opts.val_regions else None
    out = Path(opts.out)
    desc = f"pack job {opts.job_index}/{opts.num_jobs}" if opts.num_jobs > 1 else "pack"

    def log(message: str) -> None:
        print(f"{desc}: {message}", file=sys.stderr, flush=True)

    locks += lock_jobs(out, jobs, opts.num_jobs, log)
    start_jobs(opts, jobs, log)
    return files, [{"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                   for f, st in zip(files, (f.stat() for f in files))], tracks, regions


def _command(opts: PackOptions) -> bytes:
    """What every rank of an mpiexec run must have been given alike."""
    return dumps({"inputs": opts.inputs, "out": os.path.abspath(opts.out), "options": opts.recorded(),
                  "num_jobs": opts.num_jobs})


def pack_job(opts: PackOptions, ranks: MpiRanks | None = None) -> JobResult:
    """Pack this job's share of the inputs and write its job manifest; then merge the
    manifest: over MPI with `ranks` (rank 0 writes it), else the last job to finish does.
    The job is locked from before it looks at --out until it ends (lock.py)."""
    locks: list = []
    try:
        return _pack_job(opts, ranks, locks)
    finally:
        release(locks)


def _pack_job(opts: PackOptions, ranks: MpiRanks | None, locks: list) -> JobResult:
    t0 = time.monotonic()
    out = Path(opts.out)
    if ranks is None:
        files, input_list, tracks, regions = _plan_inputs(opts, [opts.job_index], locks)
    else:
        # Options are checked after the agreement (by rank 0), so that a rank with bad ones
        # does not stop before it while the others wait for it. Rank 0 locks every rank's job.
        files, input_list, tracks, regions = ranks.agree(_command(opts),
                                                         lambda: _plan_inputs(opts, range(opts.num_jobs), locks))
        opts.validate()  # the same options as rank 0's, which passed
    try:
        job, job_manifest = _pack_share(opts, files, input_list, tracks, regions)
    except Exception as e:
        if ranks is not None:  # the other ranks must not wait for this one's manifest
            ranks.merge(out, None, str(e))
        raise
    refused = None  # why manifest.json was not written although every job succeeded
    if ranks is None:
        try:
            merged, failed = try_finalize(out), []
        except EmptySplitError as e:
            merged, failed, refused = None, [], str(e)
    else:
        merged, failed = ranks.merge(out, job_manifest, None)
        refused = next((error for rank, error in failed if rank is None), None)
        failed = [(rank, error) for rank, error in failed if rank is not None]

    desc = job.desc
    dt = time.monotonic() - t0
    counters = job.counters
    skipped = [f"{files[i]}: {c.error}" for i, c in sorted(job.bad.items())]
    bases = sum(e["bases"] for e in job.inputs if e["status"] == "ok")
    kept, dropped = counters["windows"]["kept"]["windows"], counters["windows"]["dropped"]["windows"]
    plan = job_manifest["shards"]
    say = job.progress.write
    say(
        f"{desc}: {bases / 1e6:.2f} Mbp from {len(job.inputs) - len(skipped)} file(s) -> {len(plan)} shard(s), "
        f"{sum(s['samples'] for s in plan)} samples ({kept} windows kept, {dropped} dropped: "
        + ", ".join(f"{r} {v.get('windows', v.get('records', 0))}" for r, v in counters["dropped"].items())
        + f"); {job.resumed} shard(s) kept from an earlier run; {dt:.1f} s, {bases / 1e6 / max(dt, 1e-9):.1f} Mbp/s"
    )
    mine = split_counts(opts.recorded(), _job_totals(job_manifest))
    say(f"{desc}: this job's {mine}" if opts.num_jobs > 1 else f"{desc}: {mine}")
    if merged is not None and opts.num_jobs > 1:
        say(f"{desc}: the whole pack's {split_counts(merged['options'], merged['totals'])}")
    if merged is not None:
        for warning in empty_splits(merged) + region_warnings(merged):
            say(f"{desc}: warning: {warning}")
    for s in skipped:
        say(f"{desc}: SKIPPED {s}")
    exit_code = 1 if skipped else 0
    if refused is not None:  # one line, by the job that merged (rank 0 under mpiexec); every job exits 2
        if ranks is None or ranks.rank == 0:
            say(f"hyena-glt pack: error: {refused}")
        exit_code = 2
    elif ranks is not None and failed:
        for rank, error in failed:
            say(f"{desc}: manifest.json not written: job {rank} failed: {error}")
        exit_code = 2 if any(rank == ranks.rank for rank, _ in failed) else exit_code
    elif ranks is not None:
        say(f"{desc}: " + (f"merged the job manifests of the {ranks.size} MPI ranks, gathered over MPI; wrote "
                           f"{out / 'manifest.json'}" if merged is not None else
                           "job manifest gathered over MPI to rank 0, which wrote manifest.json"))
    elif merged is not None:
        say(f"{desc}: wrote {out / 'manifest.json'}")
    else:
        say(f"{desc}: job manifest written; the last job to finish (or `hyena-glt pack --finalize {out}`) "
            "writes manifest.json")
    return JobResult(exit_code, job_manifest, merged, skipped)


def split_counts(options: dict, totals: dict) -> str:
    """One line of the samples, windows, bases and records of every split asked for or not
    empty, from a manifest's (or one job's) totals."""
    shown = [s for s in SPLITS if s in asked_splits(options) or totals.get(s, {}).get("samples")]
    parts = []
    for split in shown:
        t = totals.get(split, {})
        if not t.get("samples"):
            parts.append(f"{split} empty")
        else:
            parts.append(f"{split} {t['samples']} samples ({t['windows']} windows, {t['bases']} bases, "
                         f"{t['records']} record(s))")
    return "splits: " + "; ".join(parts)


def _job_totals(job_manifest: dict) -> dict:
    """A job's totals per split, as the merged manifest has them for the whole pack."""
    totals = {s: {"samples": 0, "windows": 0, "bases": 0, "records": 0} for s in SPLITS}
    for shard in job_manifest["shards"]:
        totals[shard["split"]]["samples"] += shard["samples"]
        totals[shard["split"]]["bases"] += shard["bases"]
    for split, n in job_manifest["kept_windows"].items():
        totals[split]["windows"] += n
    for split, n in job_manifest["records"].items():
        totals[split]["records"] += n
    return totals


def _pack_share(opts: PackOptions, files: list[Path], input_list: list[dict], tracks: Tracks | None,
                regions: Regions | None) -> tuple[JobBooks, dict]:
    """Pack this job's files (or its share of records), keeping what an earlier run
    completed; write its job manifest. Returns the job's books and its manifest."""
    job_index, num_jobs = opts.job_index, opts.num_jobs
    out = Path(opts.out)
    done = state_dir(out) / f"job-{job_index:05d}"
    done.mkdir(parents=True, exist_ok=True)
    owners = assign_files([e["size"] for e in input_list], num_jobs)
    shared = len(files) < num_jobs
    mine = [i for i, jobs in enumerate(owners) if job_index in jobs]
    desc = f"pack job {job_index}/{num_jobs}" if num_jobs > 1 else "pack"
    estimates = {i: estimate_bases(files[i]) for i in mine}

    log = CompletionLog(done)
    resume, bad, written_here = log.exists(), {}, set()
    while True:
        input_sha = None
        if resume:
            input_sha = {str(files[i]): sha256_file(files[i]) for i in mine if i not in bad}
            input_sha.update({str(p): tracks.sha256(p) for p in tracks.files} if tracks else {})
        ctx = PackContext(opts, files, shared, out, log.read() if resume else {}, input_sha, tracks, dict(bad),
                          regions)
        workers = min(opts.workers, len(mine))
        procs = start_workers(ctx, mine, workers) if workers > 1 else []
        progress = Progress(sum(estimates.values()), desc, opts.progress)  # after the fork: tqdm runs a thread
        job = JobBooks(files, log, estimates, progress, written_here, desc)
        failed = True
        try:
            if procs:
                pack_with_workers(ctx, mine, job, procs)
            else:
                _pack_inline(ctx, mine, job)
            failed = False
            break
        except SkipFile as e:
            # Plan again without the file; what was completed before it is kept, as on resume.
            bad[e.index] = e.check
            resume = True
        except ResumeMismatch as e:
            progress.write(f"{desc}: {e}; packing everything again")
            log.clear()
            resume = False
        finally:
            stop_workers(procs, failed)
            progress.close()
            log.close()

    plan = set(job.shard_inputs)
    missing = [name for name in plan if name not in job.entries]
    assert not missing, missing
    _remove_stale(out, job_index, plan)
    log.finish(job.records)
    job_manifest = {
        "format": "hyena-glt-pack-job/1",
        "job_index": job_index,
        "num_jobs": num_jobs,
        "options": opts.recorded(),
        "input_list": input_list,
        "inputs": job.inputs,
        "shards": [job.entries[name] for name in sorted(plan)],
        **job.counters,
        "empty_split": opts.empty_split,  # whether the merge refuses a split asked for that is empty
    }
    holdout = job_holdout(job_manifest["options"], regions, job.regions_seen)
    if holdout is not None:
        job_manifest["holdout"] = holdout
    write_job_manifest(out, job_index, job_manifest)
    return job, job_manifest


def run_pack(opts: PackOptions, ranks: MpiRanks | None = None, stream=None) -> int:
    """Pack as one job (under mpiexec: one rank of `ranks`); exit code."""
    try:
        result = pack_job(opts, ranks)
    except BadInputError as e:
        print(f"hyena-glt pack: error: {e} (use --skip-bad-files to skip such files)", file=stream or sys.stderr)
        return 2
    except RankFailed:
        return 2  # another rank failed at the plan and said why
    return result.exit_code
