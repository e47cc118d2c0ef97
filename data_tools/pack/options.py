"""What a pack is made with: `PackOptions`, checked, and the part of them that defines the
output (what the manifest records), and their agreement with a pack already in --out."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..holdout import regions_path, sha256_or_none
from ..manifest import dumps, state_dir
from ..shards import atomic_write
from ..tracks import FORMAT as TRACK_FORMAT
from ..tracks import MEMBER as TRACK_MEMBER


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
    split_by: str = "record"  # record: whole records per split; position: a block of each record's windows
    val_regions: str | None = None  # a BED file: windows overlapping its intervals go to val (holdout.py)
    # How the work is run; never part of the output.
    empty_split: str = "warn"  # a split asked for that comes out empty: "refuse" (no manifest.json) or "warn"
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
            (self.split_by in ("record", "position"), "--split-by must be 'record' or 'position'"),
            (not (self.val_regions and self.val_fraction > 0),
             "--val-regions defines the val split: leave out --val-fraction (or give 0)"),
            (not (self.val_regions and self.split_by == "position"),
             "--val-regions and --split-by position both hold out part of each record: give one of them"),
            (self.empty_split in ("refuse", "warn"), "empty_split must be 'refuse' or 'warn'"),
        ]
        for ok, msg in rules:
            if not ok:
                raise ValueError(msg)

    def recorded(self) -> dict:
        """The options that define the output (what the manifest records)."""
        d = asdict(self)
        for k in ("inputs", "out", "workers", "num_jobs", "job_index", "progress", "conservation", "empty_split"):
            d.pop(k)
        # Absent when splits are per record, so such packs keep their bytes.
        if self.split_by == "record":
            d.pop("split_by")
        d.pop("val_regions")
        if self.val_regions:  # the file's sha256: another BED in the same --out is other options
            path = regions_path(self.val_regions)
            d["val_regions"] = {"path": path, "sha256": sha256_or_none(path)}
        if self.conservation:  # absent otherwise, so packs without tracks keep their bytes
            d["conservation"] = {"format": TRACK_FORMAT, "member": TRACK_MEMBER,
                                 "sources": [os.path.abspath(p) for p in self.conservation]}
        return d


def check_options_file(out: Path, opts: PackOptions) -> None:
    """Refuse a pack with other options than the one in --out (ValueError), or record these
    options there if none is. Under the pack's state lock (lock.py: `start_jobs`), so of two
    packs starting together one records and the other compares."""
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
