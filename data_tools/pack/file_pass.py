"""One file of a job: read (and checked), planned, written (`FilePass`), and what planning
hands from one file to the next (`Handover`), across processes when workers pack
consecutive files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hyena_glt.alphabet import SeqType, reverse_complement

from ..fasta import BadInputError, FastaReader, FileCheck
from ..holdout import OVERLAP_REASON, Regions, overlap_windows, position_runs
from ..shards import ShardFile, ShardIO, kept_record, sample_key_format, shard_name
from ..tracks import Tracks
from ..windows import (
    SEQ_TYPE_NAMES,
    SPLITS,
    JobAssigner,
    num_windows,
    split_of,
    strands_for,
    units,
    unknown_residue,
)
from .options import PackOptions

DROP_REASONS = ("short", "n_fraction", "empty_record")


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
class PackContext:
    """What packing any of the job's files needs; workers get it when they are forked."""

    opts: PackOptions
    files: list[Path]
    shared: bool  # every job reads every file and takes its share of records
    out: Path
    records: dict[str, dict]  # when resuming: the earlier runs' completion records, by shard
    input_sha: dict[str, str] | None  # when resuming: sha256 of every input, hashed first
    tracks: Tracks | None  # --conservation
    bad: dict[int, FileCheck] = field(default_factory=dict)  # files that failed their check (--skip-bad-files)
    regions: Regions | None = None  # --val-regions


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
    regions_seen: list[str] = field(default_factory=list)  # records of --val-regions found in this file


def holds_out(opts: PackOptions) -> bool:
    """Part of records is held out (--split-by position, --val-regions)."""
    return opts.split_by == "position" or bool(opts.val_regions)


class SkipFile(Exception):
    """A file failed its check under --skip-bad-files after some of it was written: plan
    again without it (the shards completed before it are kept, as on resume)."""

    def __init__(self, index: int, check: FileCheck):
        super().__init__(index, check)
        self.index, self.check = index, check


def new_counters(holdout: bool = False) -> dict:
    """The counters of a file or job; `holdout` (part of records held out): with the count of
    windows dropped for overlapping held-out ones (absent otherwise, so packs whose splits
    are per record keep their bytes)."""
    zero = lambda: {"windows": 0, "bases": 0}  # noqa: E731
    reasons = DROP_REASONS + ((OVERLAP_REASON,) if holdout else ())
    return {
        "windows": {"planned": zero(), "kept": zero(), "dropped": zero()},
        "dropped": {r: ({"records": 0} if r == "empty_record" else zero()) for r in reasons},
        "kept_windows": {},
        "records": {},
    }


def add_counters(into: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            add_counters(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


class FilePass:
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

    def __init__(self, ctx: PackContext, index: int, shard_io: ShardIO, progress):
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
        self.plan = FilePlan(index, None, True, new_counters(holds_out(self.o)))
        self.gap = overlap_windows(self.o.seq_len, self.o.stride)
        self.holds_out = holds_out(self.o)
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
                raise SkipFile(self.index, self.reader.check) from None  # partly written: plan again without it
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
        # Held out by run of windows (holdout.py), or the whole record in one split: the usual
        # case, kept as lean as before (a pack of many short records plans one per few windows).
        runs = self._runs(rec.id, L) if self.holds_out else None
        split = split_of(rec.id, o.seed, o.val_fraction, o.test_fraction) if runs is None else None
        strands = strands_for(rec.seq_type, o.reverse_complement)
        unknown = unknown_residue(rec.seq_type)
        # Most records hold no unknown residue at all: two memchr scans spare a count per window.
        counts_unknown = rec.seq.find(unknown) >= 0 or rec.seq.find(unknown.lower()) >= 0
        # Every sample's key and JSON differ only in its start and end: format them from bytes
        # templates made once per record (the JSON is ASCII: json.dumps escapes the rest).
        head = json.dumps({"record_id": rec.id, "source": self.source})[:-1].replace("%", "%%")
        tname = SEQ_TYPE_NAMES[rec.seq_type]

        def formats_of(split: str) -> tuple:
            return tuple(
                (sample_key_format(self.index, rec.index, strand),
                 f'{head}, "start": %d, "end": %d, "strand": "{strand}", "split": "{split}", "seq_type": "{tname}"}}'
                 .encode())
                for strand in strands)

        if runs is None:
            formats = formats_of(split)
            for unit in units(L, o.seq_len, o.stride, self.unit_bases):
                if self.ctx.shared and self.assigner.take(unit.bases) != o.job_index:
                    continue
                if unit.first == 0:
                    c["records"][split] = c["records"].get(split, 0) + 1
                self._plan_windows(rec, split, formats, unit.first, unit.stop, unknown if counts_unknown else None)
            return
        formats = {split: formats_of(split) for split in dict.fromkeys(r[2] for r in runs if r[2] is not None)}
        # A record counts in a split once: by the job packing the split's first window of it.
        firsts = {}
        for first, _, split in runs:
            if split is not None:
                firsts.setdefault(split, first)
        for unit in units(L, o.seq_len, o.stride, self.unit_bases):
            if self.ctx.shared and self.assigner.take(unit.bases) != o.job_index:
                continue
            for split, first in firsts.items():
                if unit.first <= first < unit.stop:
                    c["records"][split] = c["records"].get(split, 0) + 1
            for first, stop, split in runs:
                first, stop = max(first, unit.first), min(stop, unit.stop)
                if first >= stop:
                    continue
                if split is None:
                    self._drop_overlapping(L, first, stop)
                else:
                    self._plan_windows(rec, split, formats[split], first, stop, unknown if counts_unknown else None)

    def _runs(self, record_id: str, length: int) -> list[tuple[int, int, str | None]]:
        """The record's windows as runs (first, stop, split; None: dropped next to held-out
        windows) when part of records is held out: see holdout.py."""
        o = self.o
        n = num_windows(length, o.seq_len, o.stride)
        if o.split_by == "position":
            return position_runs(record_id, n, o.seed, o.val_fraction, o.test_fraction, self.gap)
        split = split_of(record_id, o.seed, o.val_fraction, o.test_fraction)
        if self.ctx.regions is not None:
            # Checked on test records too (whole in test: nothing of them is in train).
            runs = self.ctx.regions.runs(record_id, length, n, o.seq_len, o.stride, self.gap, self.source)
            if runs is not None:
                self.plan.regions_seen.append(record_id)
                if split == "train":
                    return runs
        return [(0, n, split)]

    def _drop_overlapping(self, length: int, first: int, stop: int) -> None:
        """Windows [first, stop) of a record share bases with held-out windows: dropped."""
        stride, seq_len = self.o.stride, self.o.seq_len
        nb = sum(min(k * stride + seq_len, length) - k * stride for k in range(first, stop))
        c = self.plan.counters
        for counter in (c["windows"]["planned"], c["windows"]["dropped"], c["dropped"][OVERLAP_REASON]):
            counter["windows"] += stop - first
            counter["bases"] += nb

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
