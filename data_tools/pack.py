"""`hyena-glt pack`: FASTA files -> webdataset tar shards + manifest, for one job.

One job = one process (an MPI rank, a SLURM array task, or the only one). A thread checks
each file (fasta.check_file) while the main process streams its records with pyfastx,
decides every window's fate and cuts shards (`ShardCutter`); a pool of `--workers`
processes only writes the shards it is handed, and only once the files in them passed their
check. Nothing the workers do changes what goes where, so the output bytes do not depend
on --workers.

Resume: every finished shard leaves a completion record (written after the shard and its
index were renamed into place). A restarted job recomputes the same plan, skips the shards
whose record matches, and rewrites the rest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from .fasta import BadInputError, FileCheck, check_file, discover_inputs, estimate_bases, read_records
from .manifest import dumps, state_dir, try_finalize, write_job_manifest
from .progress import Progress
from .shards import Segment, ShardCutter, atomic_write, completed, write_shard
from .windows import SPLITS, JobAssigner, ambiguous_count, assign_files, split_of, strands_for, units, window

DROP_REASONS = ("short", "n_fraction", "empty_record")


@dataclass
class PackOptions:
    inputs: list[str]
    out: str
    seq_len: int = 8192
    stride: int | None = None  # None: seq_len (no overlap)
    val_fraction: float = 0.01
    test_fraction: float = 0.0
    reverse_complement: str = "none"
    max_n_fraction: float = 0.1
    min_len: int = 64
    shard_size_mb: float = 256.0
    unit_mb: float = 16.0
    seed: int = 0
    skip_bad_files: bool = False
    # How the work is run; never part of the output.
    workers: int = 1
    num_jobs: int = 1
    job_index: int = 0
    progress: str = "auto"

    def validate(self) -> None:
        if self.stride is None:
            self.stride = self.seq_len
        rules = [
            (self.seq_len >= 1, "--seq-len must be >= 1"),
            (1 <= self.stride <= self.seq_len, f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}"),
            (0 <= self.val_fraction <= 1 and 0 <= self.test_fraction <= 1, "--val-fraction and --test-fraction must be in [0, 1]"),
            (self.val_fraction + self.test_fraction <= 1, "--val-fraction + --test-fraction must be <= 1"),
            (self.reverse_complement in ("none", "both"), "--reverse-complement must be 'none' or 'both'"),
            (0 <= self.max_n_fraction <= 1, "--max-n-fraction must be in [0, 1]"),
            (0 <= self.min_len <= self.seq_len, f"--min-len must be between 0 and --seq-len ({self.seq_len})"),
            (self.shard_size_mb > 0, "--shard-size-mb must be > 0"),
            (self.unit_mb > 0, "--unit-mb must be > 0"),
            (self.workers >= 1, "--workers must be >= 1"),
            (self.num_jobs >= 1, "--num-jobs must be >= 1"),
            (0 <= self.job_index < self.num_jobs, f"--job-index must be in [0, {self.num_jobs}), got {self.job_index}"),
            (self.progress in ("auto", "bar", "log", "none"), "--progress must be auto, bar, log or none"),
        ]
        for ok, msg in rules:
            if not ok:
                raise ValueError(msg)

    def recorded(self) -> dict:
        """The options that define the output (what the manifest records)."""
        d = asdict(self)
        for k in ("inputs", "out", "workers", "num_jobs", "job_index", "progress"):
            d.pop(k)
        return d


@dataclass
class JobResult:
    exit_code: int
    job_manifest: dict
    manifest: dict | None  # the merged manifest, if this job wrote it
    skipped: list[str] = field(default_factory=list)


def job_from_environment() -> tuple[int, int] | None:
    """(rank, size) when started by mpiexec/mpirun, else None."""
    if not any(v in os.environ for v in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")):
        return None
    try:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return comm.Get_rank(), comm.Get_size()
    except ImportError:
        for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
            if rank in os.environ and size in os.environ:
                return int(os.environ[rank]), int(os.environ[size])
    return None


class _Writer:
    """Runs write_shard inline (1 worker) or in a process pool, with a bounded number of
    shards in flight so memory stays at a few shards' worth."""

    def __init__(self, workers: int, out: Path, done: Path):
        self.out, self.done = out, done
        self.pool = None
        self.pending: list = []
        self.entries: dict[str, dict] = {}
        self.resumed = 0
        self.written: set[str] = set()
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"))
            # With fork, the pool forks all its processes in the first submit: do it now,
            # before the checking thread and tqdm's monitor thread exist.
            self.pool.submit(int)
        # One shard in progress per worker plus one queued; with the shards being filled
        # (one per split) and at most two waiting for a file's check, a job holds about
        # workers + 6 shards' worth of bases.
        self.max_pending = workers + 1

    def submit(self, task) -> None:
        entry = completed(task, self.out, self.done)
        if entry is not None:
            self.entries[task.name] = entry
            self.resumed += task.name not in self.written
        elif self.pool is None:
            self.entries[task.name] = write_shard(task, str(self.out), str(self.done))
            self.written.add(task.name)
        else:
            self.written.add(task.name)
            self.pending.append((task.name, self.pool.submit(write_shard, task, str(self.out), str(self.done))))
            while len(self.pending) > self.max_pending:
                self._collect_one()

    def _collect_one(self) -> None:
        name, fut = self.pending.pop(0)
        self.entries[name] = fut.result()

    def finish(self) -> dict[str, dict]:
        while self.pending:
            self._collect_one()
        return self.entries

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _check_options_file(out: Path, opts: PackOptions) -> None:
    path = state_dir(out) / "options.json"
    want = dumps({"options": opts.recorded(), "num_jobs": opts.num_jobs})
    if path.exists():
        have = path.read_bytes()
        if have != want:
            old = json.loads(have)
            diff = sorted(k for k in set(old["options"]) | set(opts.recorded()) if old["options"].get(k) != opts.recorded().get(k))
            if old.get("num_jobs") != opts.num_jobs:
                diff.append("num_jobs")
            raise ValueError(
                f"{out} holds a pack made with other options (differs in: {', '.join(diff)}); use an empty --out"
            )
    else:
        atomic_write(path, want)


def _remove_stale(out: Path, done: Path, job: int, keep: set[str]) -> None:
    """Shards of this job that the current plan does not have (the inputs changed since an
    earlier run), and temporary files a killed run left behind."""
    for split in SPLITS:
        for p in out.glob(f"{split}-{job:05d}-*"):
            if p.name.rsplit(".", 1)[0] not in keep:
                p.unlink()
        for p in out.glob(f".{split}-{job:05d}-*.tmp"):
            p.unlink()
    for p in done.glob("*.json"):
        if p.stem not in keep:
            p.unlink()
    for p in done.glob(".*.tmp"):
        p.unlink()


def pack_job(opts: PackOptions) -> JobResult:
    opts.validate()
    t0 = time.monotonic()
    job, num_jobs = opts.job_index, opts.num_jobs
    files = discover_inputs(opts.inputs)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    done = state_dir(out) / f"job-{job:05d}"
    done.mkdir(parents=True, exist_ok=True)
    _check_options_file(out, opts)
    stats = [f.stat() for f in files]
    input_list = [{"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns} for f, st in zip(files, stats)]
    owners = assign_files([st.st_size for st in stats], num_jobs)
    shared = len(files) < num_jobs  # every job reads every file and takes its share of records
    mine = [i for i, jobs in enumerate(owners) if job in jobs]

    writer = _Writer(opts.workers, out, done)
    checker = ThreadPoolExecutor(1)  # checks files (ahead of) while they are packed
    desc = f"pack job {job}/{num_jobs}" if num_jobs > 1 else "pack"
    estimates = {i: estimate_bases(files[i]) for i in mine}
    progress = Progress(sum(estimates.values()), desc, opts.progress)
    bad: dict[int, FileCheck] = {}
    try:
        checks = {i: checker.submit(check_file, files[i]) for i in mine}
        while True:
            try:
                inputs, plan, counters = _pack_files(opts, files, mine, checks, estimates, shared, writer, progress, bad)
                break
            except _SkipFile as e:
                # Plan again without the file. Shards already written only hold earlier
                # files and come out the same, so the writer finds them done.
                bad[e.index] = e.check
                progress.write(f"warning: skipping {files[e.index]}: {e.check.error}")
                writer.finish()
                progress.restart(sum(n for i, n in estimates.items() if i not in bad))
        entries = writer.finish()
    finally:
        checker.shutdown(wait=True, cancel_futures=True)
        writer.close()
        progress.close()

    skipped = [f"{files[i]}: {c.error}" for i, c in sorted(bad.items())]
    missing = [name for name in plan if name not in entries]
    assert not missing, missing
    _remove_stale(out, done, job, set(plan))
    job_manifest = {
        "format": "hyena-glt-pack-job/1",
        "job_index": job,
        "num_jobs": num_jobs,
        "options": opts.recorded(),
        "input_list": input_list,
        "inputs": inputs,
        "shards": [entries[name] for name in sorted(plan)],
        **counters,
    }
    write_job_manifest(out, job, job_manifest)
    merged = try_finalize(out)

    dt = time.monotonic() - t0
    bases = sum(e["bases"] for e in inputs if e["status"] == "ok")
    kept, dropped = counters["windows"]["kept"]["windows"], counters["windows"]["dropped"]["windows"]
    progress.write(
        f"{desc}: {bases / 1e6:.2f} Mbp from {len(inputs) - len(skipped)} file(s) -> {len(plan)} shard(s), "
        f"{sum(entries[n]['samples'] for n in plan)} samples ({kept} windows kept, {dropped} dropped: "
        + ", ".join(f"{r} {v.get('windows', v.get('records', 0))}" for r, v in counters["dropped"].items())
        + f"); {writer.resumed} shard(s) kept from an earlier run; {dt:.1f} s, {bases / 1e6 / max(dt, 1e-9):.1f} Mbp/s"
    )
    for s in skipped:
        progress.write(f"{desc}: SKIPPED {s}")
    if merged is not None:
        progress.write(f"{desc}: wrote {out / 'manifest.json'}")
    else:
        progress.write(f"{desc}: job manifest written; the last job to finish (or `hyena-glt pack --finalize {out}`) writes manifest.json")
    return JobResult(1 if skipped else 0, job_manifest, merged, skipped)


class _SkipFile(Exception):
    """A file failed its check under --skip-bad-files: plan again without it."""

    def __init__(self, index: int, check: FileCheck):
        self.index, self.check = index, check


def _pack_files(opts, files, mine, checks, estimates, shared, writer, progress, bad: dict[int, FileCheck]):
    job = opts.job_index
    assigner = JobAssigner(list(range(opts.num_jobs)))
    unit_bases = max(1, int(opts.unit_mb * 1e6))
    cutters = {s: ShardCutter(s, job, int(opts.shard_size_mb * 1e6)) for s in SPLITS}
    plan: list[str] = []
    inputs, sha = [], {}
    zero = lambda: {"windows": 0, "bases": 0}  # noqa: E731
    windows = {"planned": zero(), "kept": zero(), "dropped": zero()}
    dropped = {r: ({"records": 0} if r == "empty_record" else zero()) for r in DROP_REASONS}
    kept_windows: dict[str, int] = defaultdict(int)
    records: dict[str, int] = defaultdict(int)

    def drop(reason: str, s: int, e: int) -> None:
        for d in (dropped[reason], windows["dropped"]):
            d["windows"] += 1
            d["bases"] += e - s

    def dispatch(tasks) -> None:
        for task in tasks:
            task.inputs = {src: sha[src] for src in task.inputs}
            plan.append(task.name)
            writer.submit(task)

    for i in mine:
        fut, source = checks[i], str(files[i])
        entry = {"path": source, "status": "ok", "error": None}
        if i in bad:
            c = bad[i]
            inputs.append({**entry, "size": c.size, "sha256": c.sha256, "compression": c.compression,
                           "records": 0, "bases": 0, "status": "skipped", "error": c.error})
            continue
        # Shards cut while the file's check still runs wait here: nothing of a file is
        # written before it has passed.
        held: list | None = []
        try:
            for rec in read_records(files[i], fut.result):
                progress.update(len(rec.seq))
                L = len(rec.seq)
                if L == 0:
                    if not shared or assigner.take(0) == job:
                        dropped["empty_record"]["records"] += 1
                        progress.write(f"warning: {source}: record '{rec.id}' (#{rec.index + 1}) has no sequence; not packed")
                    continue
                split = split_of(rec.id, opts.seed, opts.val_fraction, opts.test_fraction)
                template = Segment(i, rec.index, rec.id, source, int(rec.seq_type), 0,
                                   strands=strands_for(rec.seq_type, opts.reverse_complement))
                cutter = cutters[split]
                for unit in units(L, opts.seq_len, opts.stride, unit_bases):
                    if shared and assigner.take(unit.bases) != job:
                        continue
                    if unit.first == 0:
                        records[split] += 1
                    for k in range(unit.first, unit.stop):
                        s, e = window(k, L, opts.seq_len, opts.stride)
                        windows["planned"]["windows"] += 1
                        windows["planned"]["bases"] += e - s
                        if e - s < opts.min_len:
                            drop("short", s, e)
                        elif ambiguous_count(rec.seq, s, e, rec.seq_type) > opts.max_n_fraction * (e - s):
                            drop("n_fraction", s, e)
                        else:
                            cutter.add(template, s, e, rec.seq)
                            windows["kept"]["windows"] += 1
                            windows["kept"]["bases"] += e - s
                            kept_windows[split] += 1
                cutter.end_record(rec.seq)
                ready = cutter.take_ready()
                if held is not None and (fut.done() or len(held) > 1):  # waits rather than hold many
                    fut.result().raise_if_bad()
                    sha[source] = fut.result().sha256
                    ready, held = held + ready, None
                if held is None:
                    dispatch(ready)
                else:
                    held += ready
        except BadInputError:
            c = fut.result()
            if c.error and opts.skip_bad_files:
                raise _SkipFile(i, c) from None
            raise
        c = fut.result()
        sha[source] = c.sha256
        dispatch(held or [])
        progress.set_total(progress.total - estimates[i] + c.bases)
        inputs.append({**entry, "size": c.size, "sha256": c.sha256, "compression": c.compression,
                       "records": c.records, "bases": c.bases})
    for c in cutters.values():
        dispatch(c.finish())
    counters = {"windows": windows, "dropped": dropped, "kept_windows": dict(kept_windows), "records": dict(records)}
    return inputs, plan, counters


def run_pack(opts: PackOptions, stream=None) -> int:
    """Pack as one job (MPI rank/size taken from mpiexec when not given); exit code."""
    try:
        result = pack_job(opts)
    except BadInputError as e:
        print(f"hyena-glt pack: error: {e} (use --skip-bad-files to skip such files)", file=stream or sys.stderr)
        return 2
    return result.exit_code
