"""Fuzzing the conservation-track reader of `hyena-glt pack --conservation` (data_tools/tracks.py:
`Tracks`, `.track`): bedGraph (plain or gzip), `.npy` and `.npz`.

Inputs: bedGraph files generated from intervals (header lines, gaps, unsorted lines, numbers
written in several ways), arrays saved with numpy (several dtypes, also 2-D, object, complex,
strings, NaN, inf, values beyond float16) and .npz archives, then damaged byte by byte.
Properties: an undamaged track gives exactly its scores as float16 (NaN where no interval);
anything else is a BadTrackError, one line naming the file; `pack` exits 0 or 2 with that line.
"""

from __future__ import annotations

import gzip
import io
import warnings

import numpy as np
import pytest
from fuzzlib import (
    assert_one_line_error,
    budget,
    damaged,
    mapped_error,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

from data_tools.tracks import BadTrackError, Tracks

RECORDS = {"chr1": 40, "chr2": 25}
FASTA = b">chr1 first\n" + b"ACGT" * 10 + b"\n>chr2\n" + b"ACGTA" * 5 + b"\n"
NUMBERS = st.one_of(st.integers(-1000, 1000).map(float), st.floats(-60000, 60000, allow_nan=False, width=32),
                    st.sampled_from([0.0, -0.0, 0.5, 65504.0, -65504.0, 1e-8]))

# A warning the reader lets through is printed by the command: a failure here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")


@st.composite
def bedgraph(draw) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the file's bytes, each record's scores as float16 with NaN where no interval)."""
    lines = draw(st.lists(st.sampled_from(["track type=bedGraph name=x", "browser position chr1:1-10", "# comment"]),
                          max_size=2))
    body, dense = [], {}
    for chrom, length in RECORDS.items():
        cuts = sorted(draw(st.sets(st.integers(0, length), max_size=8)))
        want = np.full(length, np.nan, dtype="<f2")
        for a, b in zip(cuts, cuts[1:]):
            if draw(st.booleans()):
                v = draw(NUMBERS)
                shown = draw(st.sampled_from([repr(v), f"{v:g}", f"{v:.3e}"]))
                body.append(f"{chrom}\t{a}\t{b}\t{shown}")
                want[a:b] = np.float16(float(shown))
        if any(line.startswith(chrom + "\t") for line in body):
            dense[chrom] = want
    if not body:
        body.append("chr1\t0\t1\t1")
        dense["chr1"] = np.full(40, np.nan, dtype="<f2")
        dense["chr1"][0] = 1
    if draw(st.booleans()):
        body = draw(st.permutations(body))
    sep = draw(st.sampled_from(["\t", " "]))
    return ("\n".join(lines + [x.replace("\t", sep) for x in body]) + "\n").encode(), dense


ARRAYS = st.one_of(
    st.sampled_from(["<f4", "<f8", "<f2", ">f4", "<i2", "<u1", "<i8"]).flatmap(
        lambda dt: st.tuples(st.just(dt), st.sampled_from(list(RECORDS)))
    ).map(lambda t: ("ok", t[0], t[1])),
    st.sampled_from(["2d", "object", "complex", "str", "bool", "nan", "inf", "big", "short", "long", "0d", "structured"])
    .map(lambda kind: (kind, "<f4", "chr1")),
)


def _array(kind: str, dtype: str, rid: str, rng: np.random.Generator):
    n = RECORDS[rid]
    values = rng.uniform(-10, 10, n)
    if kind == "ok":
        return values.astype(dtype) if dtype[1] == "f" else rng.integers(0, 100, n).astype(dtype)
    return {"2d": lambda: values.reshape(1, n), "object": lambda: np.array([1.0, "x"] * (n // 2), dtype=object),
            "complex": lambda: values.astype(complex), "str": lambda: values.astype(str), "bool": lambda: values > 0,
            "nan": lambda: np.where(np.arange(n) == 3, np.nan, values), "inf": lambda: np.append(values[:-1], np.inf),
            "big": lambda: values * 1e5, "short": lambda: values[:-1], "long": lambda: np.append(values, 1.0),
            "0d": lambda: np.float32(1.0), "structured": lambda: np.zeros(n, dtype=[("a", "<f4")])}[kind]()


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@st.composite
def track_file(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a track file, valid or not."""
    form = draw(st.sampled_from(["bedgraph", "bedgraph.gz", "npy", "npz"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if form.startswith("bedgraph"):
        raw, _ = draw(bedgraph())
        return ("t.bedGraph.gz", gzip.compress(raw)) if form.endswith("gz") else ("t.bedGraph", raw)
    if form == "npy":
        kind, dtype, rid = draw(ARRAYS)
        return f"{rid}.npy", _npy_bytes(_array(kind, dtype, rid, rng))
    arrays = {}
    for rid in draw(st.sets(st.sampled_from(list(RECORDS)), min_size=1)):
        kind, dtype, _ = draw(ARRAYS)
        arrays[rid] = _array(kind, dtype, rid, rng)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return "t.npz", buf.getvalue()


def _scores(path):
    """{record: scores} of every record the track covers; BadTrackError for a bad track."""
    tracks = Tracks([str(path)])
    out = {}
    for rid, length in RECORDS.items():
        if rid in tracks.where:
            values, source = tracks.track(rid, length, path.parent / "in.fa")
            assert source == path
            assert values.dtype == np.dtype("<f2") and values.shape == (length,)
            out[rid] = values
    return out


@budget(30)
@given(bedgraph(), st.booleans())
def test_undamaged_bedgraph_gives_its_scores(case, gz):
    raw, dense = case
    with scratch() as d:
        path = d / ("t.bedGraph.gz" if gz else "t.bedGraph")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        got = _scores(path)
        assert sorted(got) == sorted(dense)
        for rid, want in dense.items():
            np.testing.assert_array_equal(got[rid], want)


@budget(30)
@given(st.data())
def test_numpy_tracks_load_exactly_or_are_refused(data):
    kind, dtype, rid = data.draw(ARRAYS)
    arr = _array(kind, dtype, rid, np.random.default_rng(data.draw(st.integers(0, 99))))
    with scratch() as d:
        path = d / f"{rid}.npy"
        path.write_bytes(_npy_bytes(arr))
        try:
            got = _scores(path)
        except BadTrackError as e:
            assert kind != "ok", f"a valid {dtype} track was refused: {e}"
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            return
        assert kind == "ok", f"a bad track ({kind}) loaded"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_array_equal(got[rid], np.asarray(arr, dtype="<f2"))


@budget(60)
@given(track_file().flatmap(lambda f: st.tuples(st.just(f[0]), damaged(st.just(f[1])))))
def test_damaged_track_loads_or_is_refused_in_one_line(case):
    name, raw = case
    with scratch() as d:
        path = d / name
        path.write_bytes(raw)
        try:
            got = _scores(path)
        except BadTrackError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
            mapped_error(e, path, conservation=[str(path)])
            return
        for values in got.values():
            finite = values[~np.isnan(values)]
            assert np.isfinite(finite).all()
            if not name.startswith("t.bedGraph"):
                assert not np.isnan(values).any(), "an array track with NaN loaded"


@budget(25)
@given(track_file().flatmap(lambda f: st.tuples(st.just(f[0]), damaged(st.just(f[1])))))
def test_pack_with_a_damaged_track_exits_0_or_2_with_one_line(case):
    name, raw = case
    with scratch() as d:
        path = d / name
        path.write_bytes(raw)
        fasta = d / "in.fa"
        fasta.write_bytes(FASTA)
        try:
            got = _scores(path)
            readable = sorted(got) == sorted(RECORDS)
        except BadTrackError:
            readable = False
        rc, _, err = run_cli("pack", fasta, "--out", d / "out", "--seq-len", "8", "--min-len", "1", "--val-fraction",
                             "0", "--allow-empty-split", "--max-n-fraction", "1", "--progress", "none",
                             "--conservation", path)
        if readable:
            assert rc == 0, err
        else:
            assert_one_line_error(rc, err, "pack", path, fasta)


# ---------------------------------------------------------------------------- found by fuzzing


def _corrupt_gzip(text: bytes) -> bytes:
    z = bytearray(gzip.compress(text))
    z[10] = 0  # the first deflate block becomes a stored block of bad length: zlib.error
    return bytes(z)


@pytest.mark.parametrize("name, raw, what", [
    ("t.bedGraph.gz", _corrupt_gzip(b"chr1\t0\t10\t1.5\n" * 20), "cannot read"),  # was zlib.error
    # the header's length cut short: numpy's header parser raises tokenize.TokenError (or SyntaxError)
    ("chr1.npy", _npy_bytes(np.zeros(40, "<f4"))[:8] + b"\x10" + _npy_bytes(np.zeros(40, "<f4"))[9:],
     "not a readable numpy file"),
])
def test_damaged_track_files_found_by_fuzzing_are_one_line(tmp_path, name, raw, what):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(BadTrackError) as e:
        _scores(path)
    assert str(e.value).startswith(f"{path}: {what}") and "\n" not in str(e.value)


def test_bedgraph_with_blank_lines_after_its_header_warns_nothing(tmp_path):
    path = tmp_path / "t.bedGraph"
    path.write_bytes(b"track type=bedGraph\nchr1\t0\t10\t1.5\n\n\nchr1\t10\t12\t2\n")
    assert sorted(_scores(path)) == ["chr1"]  # pytestmark turns a warning into a failure


@pytest.mark.parametrize("raw", [b"", b"#chr1\t0\t1\t1\n", b"track type=bedGraph\n\n"])
def test_bedgraph_without_intervals_is_refused_in_one_line(tmp_path, raw):
    path = tmp_path / "t.bedGraph"
    path.write_bytes(raw)  # numpy warned 'input contained no data' (pytestmark: a failure) and read no track
    with pytest.raises(BadTrackError, match="no intervals"):
        _scores(path)
