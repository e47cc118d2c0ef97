"""`hyena-glt pack`: FASTA files -> webdataset tar shards + manifest, for one job.

One job = one process (an MPI rank, a SLURM array task, or the only one) and its
`--workers`. A file is packed in one pass (`_FilePass`): a single decompression checks it
and yields its records (`fasta.FastaReader`), each window's fate and place are planned,
and the samples go into the shards' temporary files. Shards are cut in source order over
all the job's files, so planning a file starts from the shards as the file before it
left them (a `Handover`). Planning is cheap; reading and writing are the work. So with
several workers each takes whole files: it reads (and checks) its file while the files
before it are still being read, plans as soon as their handover comes (even in the middle
of writing another file), passes its own handover on, and writes, while the next worker
already plans. What goes where never depends on the workers, so neither do the output
bytes.

No shard holding any of a file's windows is renamed into place (or recorded) before the
whole file passed its check. A file that fails it under --skip-bad-files is left out: if
nothing of it was planned yet (it failed while read ahead), the plan goes on without it;
otherwise the job plans again from the start without it, keeping what it completed
before, as on resume.

Resume: every finished shard leaves a completion record in the job's completion log
(written after the shard and its index were renamed into place). A restarted job hashes its input files, plans everything
again and does not write a shard whose record names inputs with the same sha256 and whose
files still hash to it; once planned, such a shard must have the record's samples, bases,
size, first and last sample and inputs, else the job starts over without resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path

from .alphabet import SeqType, reverse_complement
from .fasta import BadInputError, FastaReader, FileCheck, discover_inputs, estimate_bases
from .manifest import dumps, state_dir, try_finalize, write_job_manifest
from .mpi import MpiRanks, RankFailed
from .progress import Progress
from .shards import (CompletionLog, ResumeMismatch, ShardFile, ShardIO, atomic_write, completion_record,
                     kept_record, sample_key_format, sha256_file, shard_name)
from .tracks import FORMAT as TRACK_FORMAT
from .tracks import MEMBER as TRACK_MEMBER
from .tracks import BadTrackError, Tracks
from .windows import SEQ_TYPE_NAMES, SPLITS, JobAssigner, assign_files, split_of, strands_for, units, unknown_residue

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
    conservation: list[str] | None = None  # track files or directories (tracks.py)
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
        for k in ("inputs", "out", "workers", "num_jobs", "job_index", "progress", "conservation"):
            d.pop(k)
        if self.conservation:  # absent otherwise, so packs without tracks keep their bytes
            d["conservation"] = {"format": TRACK_FORMAT, "member": TRACK_MEMBER,
                                 "sources": [os.path.abspath(p) for p in self.conservation]}
        return d


@dataclass
class JobResult:
    exit_code: int
    job_manifest: dict
    manifest: dict | None  # the merged manifest, if this job wrote it
    skipped: list[str] = field(default_factory=list)


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
    for p in done.glob(".*.tmp"):
        p.unlink()


def _ahead_bases(opts: PackOptions) -> int:
    """Bases of its file a worker may read (and check) before the files ahead of it are
    planned: whole typical genome files, and never more than a few shards' worth."""
    return max(64_000_000, 2 * int(opts.shard_size_mb * 1e6))


@dataclass
class Handover:
    """The job's shard plan between two files: what planning the next file starts from.
    It crosses processes when workers pack consecutive files."""

    begun: dict[str, int]  # per split: shards begun so far (the next shard's number)
    open: dict[str, ShardFile | None]  # per split: the shard being filled
    loads: dict[int, int]  # JobAssigner's bases per job so far (shared files)

    @classmethod
    def start(cls, num_jobs: int) -> Handover:
        return cls({s: 0 for s in SPLITS}, {s: None for s in SPLITS}, {j: 0 for j in range(num_jobs)})


@dataclass
class _Context:
    """What packing any of the job's files needs; workers get it when they are forked."""

    opts: PackOptions
    files: list[Path]
    shared: bool  # every job reads every file and takes its share of records
    out: Path
    records: dict[str, dict]  # when resuming: the earlier runs' completion records, by shard
    input_sha: dict[str, str] | None  # when resuming: sha256 of every input, hashed first
    tracks: Tracks | None  # --conservation
    bad: dict[int, FileCheck] = field(default_factory=dict)  # files that failed their check (--skip-bad-files)


@dataclass
class FilePlan:
    """One file's part of the plan, for the job's books."""

    index: int
    check: FileCheck
    ok: bool  # False: the file failed its check and is left out (--skip-bad-files)
    counters: dict = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)  # shards holding windows of this file
    ends: dict[str, int] = field(default_factory=dict)  # shard written (not kept) -> end of this file's bytes in it
    closed: list[ShardFile] = field(default_factory=list)  # shards this file's planning filled up
    warnings: list[str] = field(default_factory=list)
    track_sha: dict[str, str] = field(default_factory=dict)  # conservation track files used -> sha256


class _SkipFile(Exception):
    """A file failed its check under --skip-bad-files after some of it was written: plan
    again without it (the shards completed before it are kept, as on resume)."""

    def __init__(self, index: int, check: FileCheck):
        super().__init__(index, check)
        self.index, self.check = index, check


def _new_counters() -> dict:
    zero = lambda: {"windows": 0, "bases": 0}  # noqa: E731
    return {
        "windows": {"planned": zero(), "kept": zero(), "dropped": zero()},
        "dropped": {r: ({"records": 0} if r == "empty_record" else zero()) for r in DROP_REASONS},
        "kept_windows": {},
        "records": {},
    }


def _add_counters(into: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add_counters(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


class _FilePass:
    """Packs one file in three steps. Read: one pass that checks the file and yields its
    records. Plan (cheap, and the only step that must wait for the file before it): each
    window's fate, shard and place, from the file before's `Handover`; the updated
    handover is passed on at once. Write: the planned samples into the shards' temporary
    files, then the shards begun and filled up by this file are completed.

    A worker reads its file ahead (`read_ahead`, up to a budget of bases) while the files
    before it are still being read, plans as soon as their handover arrives and writes a
    little at a time (`write`), so that no file waits for another's writing; a record
    beyond the budget is planned and written as soon as it is read, as all records are
    with one process."""

    def __init__(self, ctx: _Context, index: int, shard_io: ShardIO, progress):
        self.ctx, self.o, self.index = ctx, ctx.opts, index
        self.source = str(ctx.files[index])
        self.io, self.progress = shard_io, progress
        self.reader = FastaReader(ctx.files[index])
        self.records = self.reader.read(ticks=True)
        self.held: list = []  # records read before this file could be planned
        self.held_bases = 0
        # A file already known to fail its check (a job planning again without it) is not read.
        self.failed = self.read_done = index in ctx.bad  # failed: its check, under --skip-bad-files
        self.limit = max(1, int(self.o.shard_size_mb * 1e6))
        self.unit_bases = max(1, int(self.o.unit_mb * 1e6))
        self.plan = FilePlan(index, None, True, _new_counters())
        self.touched: dict[str, None] = {}
        self.ends: dict[str, int] = {}
        self.begun: set[str] = set()
        self.pending: list[tuple] = []  # planned, not yet written: (shard, offset, sample, rec, s, e, samples)
        self.track_of: dict[int, object] = {}  # record index -> its conservation scores (float16), until written
        self.next_write = 0  # pending[:next_write] are written
        self.writing = None  # the shard writer a `write` cut short stopped in
        self.state: Handover | None = None

    def read_ahead(self, budget: int, pause) -> None:
        """Read records until the file ends, `budget` bases are held, or `pause()` says so
        (it is asked every ~1 ms)."""
        try:
            for rec in self.records:
                if rec is None:
                    if pause():
                        return
                    continue
                self.progress(len(rec.seq))
                self.held.append(rec)
                self.held_bases += len(rec.seq)
                if self.held_bases >= budget:
                    return
        except BadInputError:
            if not self.o.skip_bad_files:
                raise
            self.failed = True
            self.held, self.held_bases = [], 0
        self.read_done = True

    def pack(self, state: Handover, emit) -> list[tuple[ShardFile, dict]]:
        """Plan, write and complete the file in one go (see the three steps below)."""
        self.plan_file(state, emit)
        self.write()
        return self.complete()

    def plan_file(self, state: Handover, emit) -> None:
        """Plan the file from `state` (which it updates) and `emit(state, plan)` as soon as the
        plan is complete. A file not read to its end (past the read-ahead budget) is planned
        and written as the rest of it is read, so all its earlier samples are written here."""
        self.state = state
        self.assigner = JobAssigner([])
        self.assigner.load = state.loads
        if self.failed:
            self.plan = FilePlan(self.index, self.ctx.bad.get(self.index) or self.reader.check, False)
            emit(state, self.plan)
            return
        for rec in self.held:
            self._plan_record(rec)
        self.held, self.held_bases = [], 0
        if not self.read_done:
            self.write()
            try:
                for rec in self.records:
                    if rec is not None:
                        self.progress(len(rec.seq))
                        self._plan_record(rec)
                        self.write()
            except BadInputError:
                if not self.o.skip_bad_files:
                    raise
                raise _SkipFile(self.index, self.reader.check) from None  # partly written: plan again without it
            self.read_done = True
        self.plan.check, self.plan.touched, self.plan.ends = self.reader.check, list(self.touched), self.ends
        emit(state, self.plan)

    def write(self, max_bases: int | None = None) -> bool:
        """Write planned samples into the shards' temporary files, in plan order, stopping
        after about `max_bases` bases (None: all). True once every planned sample is written."""
        io, current, w, seq, view, track = self.io, None, None, None, None, None
        pending, i, n, left = self.pending, self.next_write, len(self.pending), max_bases
        self.writing = None
        while i < n and (left is None or left > 0):
            name, offset, sample, rec, s, e, samples = pending[i]
            i += 1
            if name != current:  # a run of one shard's samples is contiguous in its tar
                current, w = name, io.writer(name, offset, sample)
            if rec.seq is not seq:
                seq, view = rec.seq, memoryview(rec.seq)  # windows go from the record to the tar in one copy
                track = self.track_of.get(rec.index)
            stype = int(rec.seq_type)
            key, meta = samples[0]
            w.add(key, meta, view[s:e], stype, None if track is None else track[s:e].tobytes())
            if len(samples) == 2:  # the reverse complement: its scores in reverse too
                key, meta = samples[1]
                w.add(key, meta, reverse_complement(seq[s:e], rna=stype == SeqType.RNA), stype,
                      None if track is None else track[s:e][::-1].tobytes())
            if left is not None:
                left -= (e - s) * len(samples)
        if i < n:
            self.next_write = i
            self.writing = w
            return False
        self.pending, self.next_write = [], 0
        self.track_of.clear()
        return True

    def complete(self) -> list[tuple[ShardFile, dict]]:
        """After the file is written: complete the shards begun and filled up by it, which hold
        nothing of other files, while their index entries are in memory and their sha256 is in
        hand. Returns them with their manifest entries."""
        return [(shard, self.io.commit(shard)) for shard in self.plan.closed if shard.name in self.begun]

    def _plan_record(self, rec) -> None:
        o, c = self.o, self.plan.counters
        L = len(rec.seq)
        if L == 0:
            if not self.ctx.shared or self.assigner.take(0) == o.job_index:
                c["dropped"]["empty_record"]["records"] += 1
                self.plan.warnings.append(
                    f"warning: {self.source}: record '{rec.id}' (#{rec.index + 1}) has no sequence; not packed")
            return
        if self.ctx.tracks is not None:
            track, path = self.ctx.tracks.track(rec.id, L, self.ctx.files[self.index])
            self.track_of[rec.index] = track
            self.plan.track_sha[str(path)] = self.ctx.tracks.sha256(path)
        split = split_of(rec.id, o.seed, o.val_fraction, o.test_fraction)
        strands = strands_for(rec.seq_type, o.reverse_complement)
        unknown = unknown_residue(rec.seq_type)
        # Most records hold no unknown residue at all: two memchr scans spare a count per window.
        counts_unknown = rec.seq.find(unknown) >= 0 or rec.seq.find(unknown.lower()) >= 0
        # Every sample's key and JSON differ only in its start and end: format them from bytes
        # templates made once per record (the JSON is ASCII: json.dumps escapes the rest).
        head = json.dumps({"record_id": rec.id, "source": self.source})[:-1].replace("%", "%%")
        tname = SEQ_TYPE_NAMES[rec.seq_type]
        formats = tuple(
            (sample_key_format(self.index, rec.index, strand),
             f'{head}, "start": %d, "end": %d, "strand": "{strand}", "split": "{split}", "seq_type": "{tname}"}}'.encode())
            for strand in strands)
        for unit in units(L, o.seq_len, o.stride, self.unit_bases):
            if self.ctx.shared and self.assigner.take(unit.bases) != o.job_index:
                continue
            if unit.first == 0:
                c["records"][split] = c["records"].get(split, 0) + 1
            self._plan_windows(rec, split, formats, unit.first, unit.stop, unknown if counts_unknown else None)

    def _plan_windows(self, rec, split: str, formats, first: int, stop: int, unknown: bytes | None) -> None:
        o, seq, L = self.o, rec.seq, len(rec.seq)
        stride, seq_len, min_len, max_n = o.stride, o.seq_len, o.min_len, o.max_n_fraction
        lower = unknown.lower() if unknown else None
        planned = planned_bases = short = short_bases = ambiguous = ambiguous_bases = kept = kept_bases = 0
        for k in range(first, stop):
            s = k * stride
            e = min(s + seq_len, L)
            n = e - s
            planned += 1
            planned_bases += n
            if n < min_len:
                short += 1
                short_bases += n
            elif unknown is not None and seq.count(unknown, s, e) + seq.count(lower, s, e) > max_n * n:
                ambiguous += 1
                ambiguous_bases += n
            else:
                self._place(rec, split, formats, s, e)
                kept += 1
                kept_bases += n
        c = self.plan.counters
        w, d = c["windows"], c["dropped"]
        for key, nw, nb in (("planned", planned, planned_bases), ("kept", kept, kept_bases),
                            ("dropped", short + ambiguous, short_bases + ambiguous_bases)):
            w[key]["windows"] += nw
            w[key]["bases"] += nb
        for reason, nw, nb in (("short", short, short_bases), ("n_fraction", ambiguous, ambiguous_bases)):
            d[reason]["windows"] += nw
            d[reason]["bases"] += nb
        if kept:
            c["kept_windows"][split] = c["kept_windows"].get(split, 0) + kept

    def _place(self, rec, split: str, formats, s: int, e: int) -> None:
        """Window [s, e) of `rec` into its split's shard, cutting a new shard first if the
        window's bases (both strands) would take the shard past --shard-size-mb."""
        state = self.state
        n = e - s
        nbases = n * len(formats)
        shard = state.open[split]
        if shard is not None and shard.bases + nbases > self.limit:
            self.plan.closed.append(shard)
            shard = None
        if shard is None:
            name = shard_name(split, self.o.job_index, state.begun[split])
            state.begun[split] += 1
            kept = kept_record(self.ctx.out, self.ctx.records.get(name), self.ctx.input_sha) if self.ctx.input_sha else None
            shard = state.open[split] = ShardFile(name, split, kept)
            self.begun.add(name)
        self.touched[shard.name] = None
        offset, sample = shard.length, shard.samples
        samples = []  # (key, meta) per strand
        cons_len = 2 * n if self.ctx.tracks is not None else 0
        for key_format, meta_format in formats:
            key, meta = key_format % s, meta_format % (s, e)
            shard.place(key, len(meta), n, cons_len)
            samples.append((key, meta))
        shard.bases += nbases
        if shard.kept is None:
            self.pending.append((shard.name, offset, sample, rec, s, e, samples))
            self.ends[shard.name] = shard.length


class _Job:
    """The job's books, kept in the main process: the files' plans in file order, who
    contributed to which shard, which shards can be completed when, completion records."""

    def __init__(self, files: list[Path], log: CompletionLog, estimates: dict[int, int], progress: Progress,
                 written_here: set[str], desc: str):
        self.files, self.log, self.estimates, self.progress, self.desc = files, log, estimates, progress, desc
        self.written_here = written_here  # shards written by this run (in any attempt)
        self.inputs: list[dict] = []
        self.entries: dict[str, dict] = {}
        self.records: dict[str, bytes] = {}  # completion record of every shard completed or kept
        self.shard_inputs: dict[str, dict[str, str]] = {}  # shard -> {source: sha256}
        self.counters = _new_counters()
        self.bad: dict[int, FileCheck] = {}
        self.resumed = 0
        self.written: set[int] = set()  # files whose writes are all on disk
        self.touched_by: dict[int, list[str]] = {}
        self.contributors: dict[str, set[int]] = {}
        self.waiting: dict[str, tuple[ShardFile, set[int]]] = {}  # closed shards, files not yet written
        self.ready: list[ShardFile] = []  # closed, every file written, not yet handed to anyone

    def planned(self, pos: int, plan: FilePlan) -> None:
        c, source = plan.check, str(self.files[plan.index])
        entry = {"path": source, "status": "ok", "error": None, "size": c.size, "sha256": c.sha256,
                 "compression": c.compression, "records": c.records, "bases": c.bases}
        self.touched_by[pos] = plan.touched
        if not plan.ok:
            self.bad[plan.index] = c
            self.progress.write(f"warning: skipping {source}: {c.error}")
            self.inputs.append({**entry, "records": 0, "bases": 0, "status": "skipped", "error": c.error})
            return
        for w in plan.warnings:
            self.progress.write(w)
        for name in plan.touched:
            inputs = self.shard_inputs.setdefault(name, {})
            inputs[source] = c.sha256
            inputs.update(plan.track_sha)  # a changed track must not let a resumed job keep the shard
            self.contributors.setdefault(name, set()).add(pos)
        # A shard only this file contributed to is completed by the file's own pass.
        self.close(s for s in plan.closed if self.contributors[s.name] != {pos})
        _add_counters(self.counters, plan.counters)
        self.progress.set_total(self.progress.total - self.estimates[plan.index] + c.bases)
        self.inputs.append(entry)

    def close(self, shards) -> None:
        """`shards` get no more samples: each can be completed once every file in it is
        written."""
        for shard in shards:
            missing = self.contributors[shard.name] - self.written
            if missing:
                self.waiting[shard.name] = (shard, missing)
            else:
                self.ready.append(shard)

    def wrote(self, pos: int) -> list[ShardFile]:
        """Everything of file `pos` is on disk: the shards that can be completed now."""
        self.written.add(pos)
        for name in self.touched_by.get(pos, ()):
            if name in self.waiting:
                shard, missing = self.waiting[name]
                missing.discard(pos)
                if not missing:
                    del self.waiting[name]
                    self.ready.append(shard)
        return self.take_ready()

    def take_ready(self) -> list[ShardFile]:
        ready, self.ready = self.ready, []
        return ready

    def completed(self, shard: ShardFile, entry: dict) -> None:
        inputs = self.shard_inputs[shard.name]
        record = completion_record(shard, entry, inputs)
        if shard.kept is not None:
            if shard.kept["inputs"] != inputs:
                raise ResumeMismatch(f"{shard.name}: the earlier run's shard was made from other inputs")
            self.resumed += shard.name not in self.written_here
        else:
            self.log.append(record)
            self.written_here.add(shard.name)
        self.entries[shard.name] = entry
        self.records[shard.name] = record


def _pack_inline(ctx: _Context, mine: list[int], job: _Job) -> None:
    """One process: every file planned and written record by record. Shards continued
    from one file to the next stay open, so every tar is written in order and hashed as
    it is written."""
    state = Handover.start(ctx.opts.num_jobs)
    shard_io = ShardIO(ctx.out)
    try:
        for pos, i in enumerate(mine):
            file_pass = _FilePass(ctx, i, shard_io, job.progress.update)
            for shard, entry in file_pass.pack(state, lambda s, plan: job.planned(pos, plan)):
                job.completed(shard, entry)
            for shard in job.wrote(pos):
                job.completed(shard, shard_io.commit(shard))
        job.close(s for s in state.open.values() if s is not None)
        for shard in job.take_ready():
            job.completed(shard, shard_io.commit(shard))
    finally:
        shard_io.discard()


_PROGRESS_EVERY = 8_000_000  # bases between a worker's progress messages
_WRITE_STEP = 2_000_000  # bases a worker writes (~2 ms) between looks at its messages


def _worker(conn, ctx: _Context) -> None:
    """A worker process. It packs the files it is handed, in order, and completes the shards
    of one file that the job hands back once they are closed (it hashed them as it wrote
    them). What it does next, in this order:

    1. plan its first unplanned file once that file's handover has come and the file is
       read (or the read-ahead budget is spent: then the rest of it is planned and written
       as it is read), and read that file when its handover has come: every other worker
       may be waiting for this plan;
    2. read its first unplanned file before its handover comes, so that the plan moves on
       as soon as it does;
    3. write what it planned, a little at a time (a plan that arrives in between is made
       at once: planning never waits for writing);
    4. read ahead the files after it (up to `_ahead_bases` bases held), stopping as soon
       as a message comes;
    5. with nothing else to do, ask the job for another file: asking only when idle keeps
       a busy worker from taking files that an idle one could pack."""
    shard_io = ShardIO(ctx.out)
    queue: deque[tuple[int, _FilePass]] = deque()  # (position, pass) of the files handed to it, not yet planned
    writing: deque[tuple[int, _FilePass]] = deque()  # planned, not yet all written
    handovers: dict[int, Handover] = {}
    budget = _ahead_bases(ctx.opts)
    unreported, asked = 0, False

    def progress(n: int) -> None:
        nonlocal unreported
        unreported += n
        if unreported >= _PROGRESS_EVERY:
            conn.send(("progress", None, unreported))
            unreported = 0

    def handle(msg) -> None:
        nonlocal asked
        if msg is None:
            raise _Stop
        kind, pos, payload = msg
        if kind == "file":
            queue.append((pos, _FilePass(ctx, payload, shard_io, progress)))
            asked = False
        elif kind == "handover":
            handovers[pos] = payload
        elif kind == "complete":
            conn.send(("completed", None, [(s, shard_io.commit(s)) for s in payload]))

    def write(max_bases: int | None) -> None:
        nonlocal unreported, asked
        pos, file_pass = writing[0]
        if not file_pass.write(max_bases):
            if file_pass.writing is not None:
                w = file_pass.writing
                conn.send(("landed", pos, (w.name, w.landed())))
        else:
            writing.popleft()
            done = file_pass.complete()
            shard_io.release()  # so that any process can complete the shards this file shares
            if not (queue or writing or asked):
                # Idle from now on: ask first, so the job hands out a file before it does the
                # books of this one.
                conn.send(("more", None, None))
                asked = True
            conn.send(("progress", None, unreported))
            unreported = 0
            conn.send(("written", pos, done))

    try:
        while True:
            while conn.poll():
                handle(conn.recv())
            held = sum(p.held_bases for _, p in queue)
            head = queue[0][1] if queue else None
            ready = head is not None and queue[0][0] in handovers
            unread = next((p for _, p in queue if not p.read_done), None)
            if ready and (head.read_done or held >= budget):
                if not head.read_done:  # planned as it is read, and written at once: write in file order
                    while writing:
                        write(None)
                pos, file_pass = queue.popleft()
                file_pass.plan_file(handovers.pop(pos), lambda s, plan: conn.send(("planned", pos, (s, plan))))
                writing.append((pos, file_pass))
            elif head is not None and not head.read_done and held < budget:
                head.read_ahead(budget - held, bool if ready else conn.poll)
            elif writing:
                write(_WRITE_STEP)
            elif unread is not None and held < budget:
                unread.read_ahead(budget - held, conn.poll)
            elif not asked and unread is None and held < budget:
                conn.send(("more", None, None))
                asked = True
            else:
                handle(conn.recv())
    except _Stop:
        pass
    except _SkipFile as e:
        conn.send(("skip", None, (e.index, e.check)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the job, which stops
        if not isinstance(e, (BadInputError, BadTrackError, OSError, ResumeMismatch)):
            import traceback

            e = RuntimeError(f"pack worker failed: {traceback.format_exc()}")
        try:
            conn.send(("error", None, e))
        except OSError:
            pass


class _Stop(Exception):
    """The job has no more work for this worker."""


class _SharedShardHashes:
    """The sha256 of each shard that several files, so several workers, write, made in the
    job as the files' parts reach the disk. A worker hashes what it writes, but a shard's
    sha256 runs through its bytes in order, and the bytes before a worker's part were
    written by another process. Hashing each part as soon as it and every part before it
    are on disk leaves only the last part for when the shard is completed: hashing the
    whole tar then would keep the job's end (its last shards) waiting on one process. The
    part being written is hashed as far as its worker says it is on disk (`landed`), so
    the last part too is mostly hashed by the time it is written. The job hashes a step at
    a time while no worker message waits, so that handing on plans and files never waits
    for it."""

    STEP = 1 << 20

    def __init__(self, out: Path, written: set[int]):
        self.out, self.written = out, written  # written: the job's set of files all on disk
        self.parts: dict[str, list[tuple[int, int]]] = {}  # shard -> (file position, end offset) per part, in order
        self.hashed: dict[str, tuple[object, int, int]] = {}  # shard -> (sha256, bytes hashed, parts hashed)
        self.todo: dict[str, None] = {}  # shards with written parts not hashed yet
        self.on_disk: dict[tuple[str, int], int] = {}  # (shard, file position) -> end on disk of a part being written

    def planned(self, pos: int, plan: FilePlan) -> None:
        for name, end in plan.ends.items():
            self.parts.setdefault(name, []).append((pos, end))
        self.wrote(plan.ends)

    def wrote(self, names) -> None:
        """Parts of `names` may be on disk now (shards of one file are left to its worker)."""
        for name in names:
            if len(self.parts.get(name, ())) >= 2:
                self.todo[name] = None

    def landed(self, pos: int, name: str, end: int) -> None:
        """File `pos`'s part of shard `name` is on disk up to byte `end`."""
        self.on_disk[name, pos] = end
        self.wrote([name])

    def step(self, name: str | None = None) -> None:
        """Hash up to STEP bytes of `name` (default: any shard with work), or drop it from
        the work if none of its next part is on disk."""
        name = name or next(iter(self.todo))
        parts = self.parts[name]
        sha, done, k = self.hashed.get(name) or (hashlib.sha256(), 0, 0)
        if k == len(parts):
            del self.todo[name]
            return
        pos, part_end = parts[k]
        if pos not in self.written:
            part_end = min(part_end, self.on_disk.get((name, pos), done))
            if part_end <= done:
                del self.todo[name]
                return
        end = min(part_end, done + self.STEP)
        with open(self.out / f".{name}.tar.tmp", "rb") as f:
            f.seek(done)
            chunk = f.read(end - done)
        if len(chunk) != end - done:
            raise RuntimeError(f"{name}: its temporary tar ends at byte {done + len(chunk)}, before {end}")
        sha.update(chunk)
        self.hashed[name] = (sha, end, k + (end == parts[k][1]))
        if end == parts[k][1]:
            self.on_disk.pop((name, pos), None)

    def take(self, shard: ShardFile):
        """The sha256 of all of `shard`'s members (every file in it written), or None if it
        is not a shard of several files."""
        if len(self.parts.get(shard.name, ())) < 2:
            return None
        self.todo[shard.name] = None
        while shard.name in self.todo:
            self.step(shard.name)
        sha, done, _ = self.hashed.pop(shard.name)
        if done != shard.length:
            raise RuntimeError(f"{shard.name}: hashed {done} of its {shard.length} bytes")
        return sha


def _pack_workers(ctx: _Context, mine: list[int], job: _Job, procs: list) -> None:
    """Hands the files out in order to workers that ask, passes each file's handover on to
    the worker of the next file, and completes the shards spanning files once all their
    files are written (`_SharedShardHashes` hashes them meanwhile).

    A worker asks for a file when it is idle, which it also is while it waits for a
    handover: reading files ahead is then all it can do, but every file it reads it will
    also write. So a worker gets a file only while no other worker has less work handed out
    and not yet written; otherwise its request waits until that changes. Without this, a
    worker waiting behind a large file would read (and then have to write) all the files
    after it while the others have nothing left to do."""
    conns = [c for c, _ in procs]
    owner = {pos: conn for pos, conn in enumerate(conns)}  # position in `mine` -> its worker
    waiting: dict[int, Handover] = {}  # handovers for files not handed out yet
    nxt, written, outstanding = len(conns), 0, 0  # outstanding: shards handed back, not yet completed
    load = {conn: job.estimates[mine[pos]] for pos, conn in owner.items()}  # bases handed out, not yet written
    asking: list = []  # workers whose request for a file waits
    hashes = _SharedShardHashes(ctx.out, job.written)
    shard_io = ShardIO(ctx.out)

    def hand_out() -> None:
        nonlocal nxt
        for conn in list(asking):
            if nxt == len(mine):
                asking.clear()
                return
            if load[conn] <= min(load[c] for c in conns if c is not conn):
                asking.remove(conn)
                conn.send(("file", nxt, mine[nxt]))
                owner[nxt] = conn
                load[conn] += job.estimates[mine[nxt]]
                if nxt in waiting:
                    conn.send(("handover", nxt, waiting.pop(nxt)))
                nxt += 1

    def complete(shards) -> None:
        """Complete shards whose files are all written: a shard of one file by the worker that
        wrote it (which hashed it as it wrote), a shard of several files here."""
        nonlocal outstanding
        for shard in shards:
            contributors = job.contributors[shard.name]
            if len(contributors) == 1:
                owner[next(iter(contributors))].send(("complete", None, [shard]))
                outstanding += 1
            else:
                job.completed(shard, shard_io.commit(shard, hashes.take(shard)))

    while written < len(mine) or outstanding:
        ready = wait(conns, timeout=0 if hashes.todo else None)
        if not ready:
            hashes.step()
        for conn in ready:
            try:
                kind, pos, payload = conn.recv()
            except EOFError:
                raise RuntimeError("a pack worker process died") from None
            if kind == "progress":
                job.progress.update(payload)
            elif kind == "planned":
                state, plan = payload
                job.planned(pos, plan)
                hashes.planned(pos, plan)
                if pos + 1 == len(mine):
                    job.close(s for s in state.open.values() if s is not None)
                    complete(job.take_ready())
                elif pos + 1 in owner:
                    owner[pos + 1].send(("handover", pos + 1, state))
                else:
                    waiting[pos + 1] = state
            elif kind == "written":
                load[conn] -= job.estimates[mine[pos]]
                hand_out()
                for shard, entry in payload:
                    job.completed(shard, entry)
                written += 1
                done = job.wrote(pos)
                hashes.wrote(job.touched_by.get(pos, ()))
                complete(done)
            elif kind == "landed":
                hashes.landed(pos, *payload)
            elif kind == "completed":
                for shard, entry in payload:
                    job.completed(shard, entry)
                outstanding -= len(payload)
            elif kind == "more":
                asking.append(conn)
                hand_out()
            elif kind == "skip":
                raise _SkipFile(*payload)
            else:
                raise payload


def _start_workers(ctx: _Context, mine: list[int], n: int) -> list:
    """Fork `n` workers, each handed its first file at once, so the first starts reading
    while the next is forked (~3 ms each here; nothing pack imports loads torch, which
    would make it several times dearer)."""
    mp = get_context("fork")
    procs = []
    for pos in range(n):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_worker, args=(child, ctx), daemon=True)
        proc.start()
        child.close()
        parent.send(("file", pos, mine[pos]))
        if pos == 0:
            parent.send(("handover", 0, Handover.start(ctx.opts.num_jobs)))
        procs.append((parent, proc))
    return procs


def _stop_workers(procs: list, failed: bool) -> None:
    """Tell the workers to exit. After a success they hold nothing open and are not waited
    for (their exit, a few ms each, overlaps the job's last steps); after a failure they
    may be blocked on a handover that never comes, and are ended."""
    for conn, proc in procs:
        try:
            conn.send(None)
        except OSError:
            pass
        conn.close()
        if failed:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _plan_inputs(opts: PackOptions) -> tuple[list[Path], list[dict], Tracks | None]:
    """The inputs, what the job manifests record of them (path, size, mtime) and the
    conservation tracks, once the options are checked and --out exists and holds no pack
    made with other options. Under mpiexec rank 0 makes this for every rank."""
    opts.validate()
    files = discover_inputs(opts.inputs)
    tracks = Tracks(opts.conservation) if opts.conservation else None
    out = Path(opts.out)
    state_dir(out).mkdir(parents=True, exist_ok=True)
    _check_options_file(out, opts)
    return files, [{"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                   for f, st in zip(files, (f.stat() for f in files))], tracks


def _command(opts: PackOptions) -> bytes:
    """What every rank of an mpiexec run must have been given alike."""
    return dumps({"inputs": opts.inputs, "out": os.path.abspath(opts.out), "options": opts.recorded(),
                  "num_jobs": opts.num_jobs})


def pack_job(opts: PackOptions, ranks: MpiRanks | None = None) -> JobResult:
    """Pack this job's share of the inputs and write its job manifest; then merge the
    manifest: over MPI with `ranks` (rank 0 writes it), else the last job to finish does."""
    t0 = time.monotonic()
    out = Path(opts.out)
    if ranks is None:
        files, input_list, tracks = _plan_inputs(opts)
    else:
        # Options are checked after the agreement (by rank 0), so that a rank with bad ones
        # does not stop before it while the others wait for it.
        files, input_list, tracks = ranks.agree(_command(opts), lambda: _plan_inputs(opts))
        opts.validate()  # the same options as rank 0's, which passed
    try:
        job, job_manifest = _pack_share(opts, files, input_list, tracks)
    except Exception as e:
        if ranks is not None:  # the other ranks must not wait for this one's manifest
            ranks.merge(out, None, str(e))
        raise
    if ranks is None:
        merged, failed = try_finalize(out), []
    else:
        merged, failed = ranks.merge(out, job_manifest, None)

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
    for s in skipped:
        say(f"{desc}: SKIPPED {s}")
    exit_code = 1 if skipped else 0
    if ranks is not None and failed:
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


def _pack_share(opts: PackOptions, files: list[Path], input_list: list[dict], tracks: Tracks | None
                ) -> tuple[_Job, dict]:
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
        ctx = _Context(opts, files, shared, out, log.read() if resume else {}, input_sha, tracks, dict(bad))
        workers = min(opts.workers, len(mine))
        procs = _start_workers(ctx, mine, workers) if workers > 1 else []
        progress = Progress(sum(estimates.values()), desc, opts.progress)  # after the fork: tqdm runs a thread
        job = _Job(files, log, estimates, progress, written_here, desc)
        failed = True
        try:
            if procs:
                _pack_workers(ctx, mine, job, procs)
            else:
                _pack_inline(ctx, mine, job)
            failed = False
            break
        except _SkipFile as e:
            # Plan again without the file; what was completed before it is kept, as on resume.
            bad[e.index] = e.check
            resume = True
        except ResumeMismatch as e:
            progress.write(f"{desc}: {e}; packing everything again")
            log.clear()
            resume = False
        finally:
            _stop_workers(procs, failed)
            progress.close()
            log.close()

    plan = set(job.shard_inputs)
    missing = [name for name in plan if name not in job.entries]
    assert not missing, missing
    _remove_stale(out, done, job_index, plan)
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
    }
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
