"""Per-base conservation tracks, read by `hyena-glt pack --conservation PATH ...`.

A track gives one score per base of a record, found by the record's id (the first word of
its FASTA header) in any of the files given (directories are searched recursively):

  * `ID.npy`: a 1-D array (floats or integers) with one value per base of record ID;
  * `NAME.npz` (`numpy.savez`): one such array per record, named by the record's id;
  * `NAME.bedGraph` / `.bedgraph` / `.bg`, optionally gzipped: `chrom start end value`
    lines (0-based, half-open; `track`/`browser`/`#` header lines skipped), chrom being the
    record's id. Bases that no interval covers have no score.

Scores are stored in the shards as float16 (`FORMAT`), NaN where a base has no score; the
loaders turn NaN into their fill value. A score must be finite and fit float16 (|x| <=
65504): phyloP and phastCons do. Every record that is packed must have a track. Anything
else is a `BadTrackError`, one line naming the file (and the record, position or line).

`.npy` tracks are memory-mapped and read when their record is packed; bedGraph files are
parsed at the start, with numpy's text reader (tens of MB/s): fine up to tens of millions
of intervals, beyond that (whole mammalian genomes) write one `.npy` per chromosome.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = "float16-le/1"  # the shards' `.cons` members: little-endian float16, one per base of `.seq`
MEMBER = "cons"
NPY_SUFFIXES = (".npy",)
NPZ_SUFFIXES = (".npz",)
BEDGRAPH_SUFFIXES = tuple(s + z for s in (".bedgraph", ".bg") for z in ("", ".gz"))
_HEADER_PREFIXES = (b"track", b"browser", b"#")
_F16_MAX = float(np.finfo(np.float16).max)


class BadTrackError(ValueError):
    """A conservation track that cannot be used. The message is one line naming the file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses from a pack worker to the job
        return BadTrackError, (self.path, self.reason)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NPY_SUFFIXES):
        return "npy"
    if name.endswith(NPZ_SUFFIXES):
        return "npz"
    if name.endswith(BEDGRAPH_SUFFIXES):
        return "bedgraph"
    return None


def _find(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser().absolute()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) and not q.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"--conservation: directory {p} holds no track files "
                                        f"(.npy, .npz, .bedGraph/.bg[.gz])")
            files += found
        elif p.is_file():
            if _kind(p) is None:
                raise BadTrackError(p, "not a track file: expected .npy, .npz or .bedGraph/.bedgraph/.bg[.gz]")
            files.append(p)
        else:
            raise FileNotFoundError(f"--conservation: no such file or directory: {p}")
    return list(dict.fromkeys(files))


class Tracks:
    """The records' tracks from the files `specs` name. Built once by the job; its workers
    get it when they are forked."""

    def __init__(self, specs: list[str]):
        self.specs = specs
        self.files = _find(specs)
        self.where: dict[str, tuple[Path, str]] = {}  # record id -> (file, kind)
        self.bedgraphs: dict[Path, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._sha: dict[Path, str] = {}
        for path in self.files:
            kind = _kind(path)
            if kind == "npy":
                ids = [path.name[: -len(".npy")]]
            elif kind == "npz":
                ids = _npz_names(path)
            else:
                self.bedgraphs[path] = _read_bedgraph(path)
                ids = list(self.bedgraphs[path])
            for rid in ids:
                if rid in self.where:
                    raise BadTrackError(path, f"a second track for record '{rid}' (the first is in {self.where[rid][0]})")
                self.where[rid] = (path, kind)

    def track(self, record_id: str, length: int, fasta: Path) -> tuple[np.ndarray, Path]:
        """(the record's scores as float16, NaN where none; the file they came from)."""
        if record_id not in self.where:
            raise BadTrackError(fasta, f"record '{record_id}' has no conservation track in "
                                       f"{', '.join(map(str, self.specs))}")
        path, kind = self.where[record_id]
        if kind == "bedgraph":
            return _dense(path, record_id, length, *self.bedgraphs[path][record_id]), path
        try:
            if kind == "npy":
                values = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as z:
                    values = z[record_id]
        except Exception as e:  # a damaged header or archive: numpy and zipfile raise many kinds (SyntaxError, ...)
            raise BadTrackError(path, f"not a readable numpy file ({_one_line(e)})") from None
        return _checked(path, record_id, length, values), path

    def sha256(self, path: Path) -> str:
        """sha256 of a track file (hashed once per process): what a resumed pack compares."""
        if path not in self._sha:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 << 20):
                    h.update(chunk)
            self._sha[path] = h.hexdigest()
        return self._sha[path]


def _npz_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
    except Exception as e:  # zipfile raises BadZipFile, ValueError, NotImplementedError, ... for a damaged archive
        raise BadTrackError(path, f"not a readable .npz file ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    """An exception as one short line (numpy's header errors span lines and quote the header)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _checked(path: Path, record_id: str, length: int, values) -> np.ndarray:
    """An array track as float16, after checking its shape, type and values."""
    where = f"track of record '{record_id}'"
    if not isinstance(values, np.ndarray) or values.ndim != 1:
        raise BadTrackError(path, f"{where}: expected a 1-D array, got shape {getattr(values, 'shape', '?')}")
    if values.dtype.kind not in "fiu":
        raise BadTrackError(path, f"{where}: expected numbers, got dtype {values.dtype}")
    if len(values) != length:
        raise BadTrackError(path, f"{where}: {len(values)} values for a record of {length} bases")
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf, reported below
        out = np.asarray(values, dtype="<f2")
    _require_finite(path, where, values, out)
    return out


def _require_finite(path: Path, where: str, values: np.ndarray, as_f16: np.ndarray) -> None:
    """Every value finite, and finite as float16 too (so within its range)."""
    bad = np.flatnonzero(~np.isfinite(as_f16))
    if len(bad):
        v = float(values[bad[0]])
        what = "NaN" if np.isnan(v) else ("infinite" if np.isinf(v) else f"{v:g}, outside float16's range (|x| <= 65504)")
        raise BadTrackError(path, f"{where}: value at position {int(bad[0])} is {what} ({len(bad)} such value(s))")


def _read_bedgraph(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """chrom -> (starts, ends, values), sorted by start, intervals checked not to overlap."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadTrackError(path, f"cannot read ({e})") from None
    skip = 0
    for line in data.split(b"\n", 64)[:64]:
        if not line.startswith(_HEADER_PREFIXES) and line.strip():
            break
        skip += 1
    try:
        with warnings.catch_warnings():  # blank lines or no data at all: numpy warns (an empty file is refused below)
            warnings.filterwarnings("ignore", message="(Input line|loadtxt: input contained no data)",
                                    category=UserWarning)
            chroms = np.loadtxt(io.BytesIO(data), usecols=0, dtype="S", skiprows=skip, comments="#", ndmin=1)
            rows = np.loadtxt(io.BytesIO(data), usecols=(1, 2, 3), skiprows=skip, comments="#", ndmin=1,
                              dtype=[("start", "<i8"), ("end", "<i8"), ("value", "<f8")])
    except ValueError as e:
        raise BadTrackError(path, f"not a bedGraph file (chrom start end value per line, after {skip} header "
                                  f"line(s)): {e}") from None
    if not len(chroms):
        raise BadTrackError(path, "no intervals (expected 'chrom start end value' lines after any track/browser/# "
                                  "header lines)")
    out = {}
    names, inverse = np.unique(chroms, return_inverse=True)
    for k, name in enumerate(names):
        try:
            chrom = name.decode("utf-8")
        except UnicodeDecodeError:
            raise BadTrackError(path, f"chrom name {name[:40]!r} is not UTF-8 text") from None
        sel = rows[inverse == k]
        sel = sel[np.argsort(sel["start"], kind="stable")]
        starts, ends, values = sel["start"], sel["end"], sel["value"]
        bad = np.flatnonzero((starts < 0) | (ends <= starts))
        if len(bad):
            raise BadTrackError(path, f"interval {chrom}:{starts[bad[0]]}-{ends[bad[0]]} is empty or negative")
        overlap = np.flatnonzero(starts[1:] < ends[:-1])
        if len(overlap):
            i = int(overlap[0])
            raise BadTrackError(path, f"intervals {chrom}:{starts[i]}-{ends[i]} and {chrom}:{starts[i + 1]}-"
                                      f"{ends[i + 1]} overlap")
        with np.errstate(over="ignore"):
            _require_finite(path, f"chrom '{chrom}'", values, values.astype("<f2"))
        out[chrom] = (starts, ends, values)
    return out


def _dense(path: Path, record_id: str, length: int, starts, ends, values) -> np.ndarray:
    """A bedGraph's intervals of one record as one float16 per base, NaN where none."""
    if len(ends) and ends[-1] > length:
        raise BadTrackError(path, f"interval {record_id}:{starts[-1]}-{ends[-1]} runs past the end of the record "
                                  f"({length} bases)")
    out = np.full(length, np.nan, dtype="<f2")
    sizes = ends - starts
    # Every covered position at once: the intervals' starts repeated over their bases, plus
    # each base's offset in its interval.
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    out[first + np.arange(int(sizes.sum()))] = np.repeat(values.astype("<f2"), sizes)
    return out
