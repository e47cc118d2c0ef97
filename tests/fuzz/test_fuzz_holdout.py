"""Fuzzing the BED reader of `hyena-glt pack --val-regions` (data_tools/holdout.py `Regions`) and
the windows it holds out (`Regions.runs`).

Inputs: BED files generated from intervals (header lines, extra columns, tabs or spaces,
overlapping and unsorted intervals), damaged byte by byte, a quarter gzipped. Properties: an
undamaged file gives its intervals; the held-out windows are exactly those overlapping an
interval and no training window shares a base with one; anything else is a BadRegionsError, one
line naming the file; `pack` exits 0 or 2 with that line.
"""

from __future__ import annotations

import pytest
from fuzzlib import (
    assert_one_line_error,
    budget,
    damaged,
    mapped_error,
    maybe_gzipped,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

from data_tools.holdout import BadRegionsError, Regions, overlap_windows

RECORDS = {"chr1": 200, "chr2": 90}
FASTA = b">chr1\n" + b"ACGTTGCA" * 25 + b"\n>chr2 x\n" + b"ACGTAC" * 15 + b"\n"

# A warning the reader lets through is printed by the command: a failure here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")


@st.composite
def bed_file(draw) -> tuple[bytes, dict[str, list[tuple[int, int]]]]:
    lines = draw(st.lists(st.sampled_from(["track name=holdout", "browser position chr1:1-10", "# a comment", ""]),
                          max_size=2))
    want: dict[str, list[tuple[int, int]]] = {}
    body = []
    for _ in range(draw(st.integers(1, 6))):
        rid = draw(st.sampled_from(sorted(RECORDS)))
        start = draw(st.integers(0, RECORDS[rid] - 1))
        end = draw(st.integers(start + 1, RECORDS[rid]))
        extra = draw(st.sampled_from(["", "\tname", "\tname\t0\t+", "\t.\t960\t-"]))
        body.append(f"{rid}\t{start}\t{end}{extra}")
        want.setdefault(rid, []).append((start, end))
    sep = draw(st.sampled_from(["\t", " ", "  "]))
    text = "\n".join(lines + [b.replace("\t", sep) for b in body]) + draw(st.sampled_from(["\n", "", "\r\n"]))
    return text.encode(), {k: sorted(v) for k, v in want.items()}


def _check_runs(regions: Regions, path) -> None:
    """For every record of the BED: the val windows overlap an interval, every window
    overlapping one is val, no train window shares a base with a val window."""
    seq_len, stride = 16, 8
    gap = overlap_windows(seq_len, stride)
    for rid, intervals in regions.by_record.items():
        length = RECORDS.get(rid, 50)
        n = max(0, (length - seq_len) // stride + 1)
        try:
            runs = regions.runs(rid, length, n, seq_len, stride, gap, "in.fa")
        except BadRegionsError as e:
            assert any(end > length for _, end, _ in intervals), str(e)
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            continue
        split = {}
        for a, b, s in runs:
            for k in range(a, b):
                assert k not in split
                split[k] = s
        assert sorted(split) == list(range(n))
        for k in range(n):
            lo, hi = k * stride, k * stride + seq_len
            overlaps = any(s < hi and e > lo for s, e, _ in intervals)
            assert (split[k] == "val") == overlaps, (rid, k, split[k], intervals)
            if split[k] == "train":
                assert all(not (j * stride < hi and j * stride + seq_len > lo)
                           for j in range(n) if split[j] == "val"), (rid, k)


@budget(30)
@given(bed_file(), st.booleans())
def test_undamaged_bed_gives_its_intervals(case, gz):
    import gzip

    raw, want = case
    with scratch() as d:
        path = d / ("r.bed.gz" if gz else "r.bed")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        regions = Regions(str(path))
        assert {k: [(s, e) for s, e, _ in v] for k, v in regions.by_record.items()} == want
        _check_runs(regions, path)


@budget(60)
@given(maybe_gzipped(damaged(bed_file().map(lambda c: c[0]))))
def test_damaged_bed_loads_or_is_refused_in_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("r.bed.gz" if gz else "r.bed")
        path.write_bytes(raw)
        try:
            regions = Regions(str(path))
        except BadRegionsError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
            mapped_error(e, path, val_regions=str(path))
            return
        for intervals in regions.by_record.values():
            assert all(0 <= s < e for s, e, _ in intervals)
        _check_runs(regions, path)


@budget(25)
@given(maybe_gzipped(damaged(bed_file().map(lambda c: c[0]))))
def test_pack_with_a_damaged_bed_exits_0_or_2_with_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("r.bed.gz" if gz else "r.bed")
        path.write_bytes(raw)
        fasta = d / "in.fa"
        fasta.write_bytes(FASTA)
        rc, _, err = run_cli("pack", fasta, "--out", d / "out", "--seq-len", "16", "--stride", "8", "--min-len", "1",
                             "--val-regions", path, "--allow-empty-split", "--progress", "none")
        if rc != 0:
            assert_one_line_error(rc, err, "pack", path)


@pytest.mark.parametrize("field", [b"+5", b"1_000", b"--5", b"\xef\xbc\x95"])
def test_bed_numbers_int_would_take_are_refused(tmp_path, field):
    path = tmp_path / "r.bed"
    path.write_bytes(b"chr1\t" + field + b"\t2000\n")
    with pytest.raises(BadRegionsError, match="line 1: start .* is not a whole number"):
        Regions(str(path))


def test_corrupt_gzip_bed_is_one_line(tmp_path):
    import gzip

    z = bytearray(gzip.compress(b"chr1\t0\t10\n" * 50))
    z[10] = 0  # the first deflate block becomes a stored block of bad length: zlib.error, not BadGzipFile
    path = tmp_path / "r.bed.gz"
    path.write_bytes(bytes(z))
    with pytest.raises(BadRegionsError, match="damaged gzip file"):
        Regions(str(path))
