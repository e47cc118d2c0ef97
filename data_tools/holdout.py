"""Which split each window of a record goes to when part of a record is held out, and the
check that every split a pack was asked for holds something.

`hyena-glt pack` splits by record by default (`windows.split_of`): a whole record goes to
train, val or test. A genome of one record (a chromosome) then lands whole in one split.
Two ways hold out part of a record instead:

  * `--split-by position`: --val-fraction and --test-fraction become shares of each
    record's *windows*, held out as one contiguous block per record (val, then test) at a
    position drawn from sha256(seed, record id) (`position_runs`);
  * `--val-regions BED`: the windows overlapping a BED interval of their record go to val
    (`Regions`); --test-fraction still puts whole records in test.

Either way no training window shares a base with a held-out window: windows overlapping a
held-out window without being held out themselves (there are ceil(seq_len / stride) - 1 of
them on each side of a block when windows overlap, none when stride = seq_len) are dropped,
counted as `dropped.holdout_overlap`.

A record's plan is a list of runs `(first, stop, split)` of window indices, `split` None for
the dropped ones; it depends on the record (id, length) and the options only, so every job
and worker plans the same. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

_INTEGER = re.compile(rb"-?[0-9]+")
POSITION_RULE = "hyena-glt-position/1"  # how a block is sized and placed; see position_runs
OVERLAP_REASON = "holdout_overlap"  # the drop reason of windows next to a held-out block


class BadRegionsError(ValueError):
    """A --val-regions file that cannot be used; the message is one line naming the file
    (and its line)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses from a pack worker to the job
        return BadRegionsError, (self.path, self.reason)


class EmptySplitError(ValueError):
    """A split the pack was asked for came out empty: manifest.json is not written."""


def overlap_windows(seq_len: int, stride: int) -> int:
    """How many windows on each side of a window share bases with it."""
    return -(-seq_len // stride) - 1


def _unit(seed: int, record_id: str, what: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{what}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _runs(n: int, blocks: list[tuple[int, int, str]], gap: int) -> list[tuple[int, int, str | None]]:
    """Runs over windows [0, n): the held-out `blocks` (sorted, disjoint), the windows within
    `gap` of a block dropped (None), train elsewhere."""
    runs: list[tuple[int, int, str | None]] = []
    pos = 0
    for i, (lo, hi, split) in enumerate(blocks):
        start = max(pos, lo - gap)
        if start > pos:
            runs.append((pos, start, "train"))
        if lo > start:
            runs.append((start, lo, None))
        runs.append((lo, hi, split))
        nxt = blocks[i + 1][0] if i + 1 < len(blocks) else n
        pos = min(hi + gap, nxt, n)
        if pos > hi:
            runs.append((hi, pos, None))
    if pos < n:
        runs.append((pos, n, "train"))
    return runs


def position_runs(record_id: str, n: int, seed: int, val_fraction: float, test_fraction: float,
                  gap: int) -> list[tuple[int, int, str | None]]:
    """`--split-by position`: a record of n windows holds out round(val_fraction * n) windows
    for val and then, `gap` windows further, round(test_fraction * n) for test (shortened if
    the record has no room for it), as one block starting at floor(u * (n - block + 1)),
    u in [0, 1) from sha256(seed, record id); the `gap` windows on each side of the block
    and between its parts are dropped."""
    m_val = int(val_fraction * n + 0.5)
    m_test = min(int(test_fraction * n + 0.5), n - m_val)
    if m_val and m_test and m_val + gap + m_test > n:
        m_test = max(0, n - m_val - gap)
    between = gap if m_val and m_test else 0
    held = m_val + between + m_test
    if held == 0:
        return [(0, n, "train")]
    p = int(_unit(seed, record_id, "position") * (n - held + 1))
    blocks = []
    if m_val:
        blocks.append((p, p + m_val, "val"))
    if m_test:
        blocks.append((p + m_val + between, p + held, "test"))
    return _runs(n, blocks, gap)


class Regions:
    """The intervals of a `--val-regions` BED file, by record id (the first column, matched
    against the FASTA record ids: the first word of each header)."""

    def __init__(self, path: str):
        self.path = regions_path(path)
        try:
            data = Path(self.path).read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
        except FileNotFoundError:
            raise FileNotFoundError(f"--val-regions: no such file: {self.path}") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise BadRegionsError(self.path, f"damaged gzip file ({e})") from None
        self.by_record: dict[str, list[tuple[int, int, int]]] = {}  # id -> sorted (start, end, line)
        for lineno, line in enumerate(data.split(b"\n"), 1):
            fields = line.split()
            if not fields or fields[0].startswith(b"#") or fields[0] in (b"track", b"browser"):
                continue
            self.by_record.setdefault(self._name(fields, lineno), []).append((*self._bounds(fields, lineno), lineno))
        if not self.by_record:
            raise BadRegionsError(self.path, "no intervals (expected lines of: record start end, 0-based, "
                                             "half-open, tab-separated)")
        for intervals in self.by_record.values():
            intervals.sort()
        self.intervals = sum(len(v) for v in self.by_record.values())
        self.bases = sum(_merged_length(v) for v in self.by_record.values())

    def _name(self, fields: list[bytes], lineno: int) -> str:
        if len(fields) < 3:
            raise BadRegionsError(self.path, f"line {lineno}: expected at least 3 fields (record start end), "
                                             f"got {len(fields)}")
        try:
            return fields[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRegionsError(self.path, f"line {lineno}: the record name is not UTF-8 text") from None

    def _bounds(self, fields: list[bytes], lineno: int) -> tuple[int, int]:
        out = []
        for what, raw in (("start", fields[1]), ("end", fields[2])):
            if not _INTEGER.fullmatch(raw):  # int() would also take '+5' and '1_000'
                raise BadRegionsError(self.path, f"line {lineno}: {what} {raw.decode('utf-8', 'replace')!r} is not "
                                                 "a whole number")
            value = int(raw)
            if value < 0:
                raise BadRegionsError(self.path, f"line {lineno}: {what} {value} is negative")
            out.append(value)
        if out[1] <= out[0]:
            raise BadRegionsError(self.path, f"line {lineno}: empty interval (end {out[1]} <= start {out[0]})")
        return out[0], out[1]

    def sha256(self) -> str:
        return sha256_or_none(self.path)

    def runs(self, record_id: str, length: int, n: int, seq_len: int, stride: int, gap: int, source: str
             ) -> list[tuple[int, int, str | None]] | None:
        """The runs of a record (None: the BED has no interval on it): the windows overlapping
        an interval go to val. An interval past the record's end is an error."""
        intervals = self.by_record.get(record_id)
        if intervals is None:
            return None
        blocks: list[list] = []
        for start, end, lineno in intervals:
            if end > length:
                raise BadRegionsError(self.path, f"line {lineno}: interval {record_id}:{start}-{end} runs past the end "
                                                 f"of record '{record_id}' ({length} bases) in {source}")
            lo = max(0, (start - seq_len) // stride + 1)  # first window with k*stride + seq_len > start
            hi = min(n, (end - 1) // stride + 1)  # one past the last window with k*stride < end
            if blocks and lo <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], hi)
            else:
                blocks.append([lo, hi, "val"])
        return _runs(n, [tuple(b) for b in blocks], gap)


def _merged_length(intervals: list[tuple[int, int, int]]) -> int:
    total, end = 0, -1
    for s, e, _ in intervals:
        if s >= end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def regions_path(path: str) -> str:
    """The absolute path a --val-regions file is recorded under."""
    return os.path.abspath(os.path.expanduser(path))


def sha256_or_none(path: str) -> str | None:
    """sha256 of a file, None if it cannot be read (the options' digest must not fail before
    the options are checked)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------------------- the manifest


def job_holdout(options: dict, regions: Regions | None, seen: set[str]) -> dict | None:
    """What a job manifest records of the hold-out (None when splits are per record): the
    rule, and for --val-regions the file's counts and the BED records this job did not find."""
    if options.get("split_by", "record") == "position":
        return {"mode": "position", "rule": POSITION_RULE,
                "overlap_windows": overlap_windows(options["seq_len"], options["stride"])}
    if regions is None:
        return None
    return {"mode": "val_regions", "overlap_windows": overlap_windows(options["seq_len"], options["stride"]),
            "val_regions": {"path": regions.path, "sha256": regions.sha256(), "records": len(regions.by_record),
                            "intervals": regions.intervals, "bases": regions.bases,
                            "records_not_found": sorted(set(regions.by_record) - seen)}}


def merge_holdout(parts: list[dict]) -> dict:
    """The jobs' hold-out records as one: a BED record is not found if no job found it."""
    out = {k: v for k, v in parts[0].items() if k != "val_regions"}
    if "val_regions" in parts[0]:
        missing = set(parts[0]["val_regions"]["records_not_found"])
        for p in parts[1:]:
            missing &= set(p["val_regions"]["records_not_found"])
        out["val_regions"] = {**parts[0]["val_regions"], "records_not_found": sorted(missing)}
    return out


def asked_splits(options: dict) -> list[str]:
    """The splits the options ask for: val and test with a fraction > 0 (val also with
    --val-regions), train unless the fractions take every record or window."""
    val, test = options["val_fraction"], options["test_fraction"]
    out = ["train"] if val + test < 1 - 1e-9 else []  # 0.7 + 0.3 is 0.9999999999999999
    if val > 0 or options.get("val_regions"):
        out.append("val")
    if test > 0:
        out.append("test")
    return out


def _windows_for_one(fraction: float) -> int:
    """The fewest windows a record needs for round(fraction * windows) >= 1."""
    n = max(1, int(0.5 / fraction) - 1)
    while int(fraction * n + 0.5) < 1:
        n += 1
    return n


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def empty_splits(manifest: dict) -> list[str]:
    """One message per split the pack was asked for and holds no sample, saying why and what
    to do (without the --allow-empty-split hint, which only a refusal adds)."""
    o, totals = manifest["options"], manifest["totals"]
    empty = [s for s in asked_splits(o) if not totals.get(s, {}).get("samples")]
    if not empty:
        return []
    if not any(t.get("samples") for t in totals.values()):
        return ["nothing was packed: every window was dropped (see the counts of dropped windows above)"]
    records = manifest["input_totals"]["records"]
    mode = "regions" if o.get("val_regions") else o.get("split_by", "record")
    out = []
    for split in empty:
        if split == "train":
            why = {"record": f"each of the {records} record(s) fell in val or test (--val-fraction and --test-fraction "
                             "are shares of whole records); hold out part of each record with --split-by position",
                   "position": "the held-out blocks and the windows overlapping them took every window; lower "
                               "--val-fraction/--test-fraction, or --seq-len/--stride",
                   "regions": "every window is in val or test or overlaps a val window; hold out fewer regions"}[mode]
        elif mode == "record":
            flag = f"--{split}-fraction {o[f'{split}_fraction']}"
            why = (f"{flag} is a share of whole records and none of the {records} record(s) fell in {split}; "
                   "hold out part of each record with --split-by position"
                   + (" or --val-regions BED" if split == "val" else ""))
        elif mode == "position":
            f = o[f"{split}_fraction"]
            why = (f"--split-by position holds out round({f} x windows) of each record for {split}, which is 0 for "
                   f"every record here (a record needs {_windows_for_one(f)} windows of --seq-len {o['seq_len']} "
                   f"at --stride {o['stride']}); raise --{split}-fraction or lower --seq-len/--stride")
        elif split == "val":
            vr = manifest.get("holdout", {}).get("val_regions", {})
            missing = vr.get("records_not_found", [])
            why = f"no window overlaps an interval of --val-regions {o['val_regions']['path']}"
            if missing and len(missing) == vr.get("records"):
                why += (f": none of its record names ({_names(missing)}) is a record id of the inputs (the first "
                        "word of a FASTA header)")
            else:
                why += " (or every such window was dropped: too short or too many N)"
        else:  # test with --val-regions: whole records
            why = (f"--test-fraction {o['test_fraction']} is a share of whole records and none of the {records} "
                   "record(s) fell in test")
        out.append(f"{split} is empty: {why}")
    return out


def region_warnings(manifest: dict) -> list[str]:
    """Warnings about a pack that has its splits: BED records that no input has."""
    vr = manifest.get("holdout", {}).get("val_regions")
    if not vr or not vr["records_not_found"] or len(vr["records_not_found"]) == vr["records"]:
        return []
    missing = vr["records_not_found"]
    return [(f"{len(missing)} of the {vr['records']} record(s) of --val-regions {vr['path']} are not among the "
             f"inputs' records ({_names(missing)}); their intervals hold nothing out")]
