"""Finding FASTA inputs, checking them, and reading their records.

pyfastx parses fast, but it silently returns a shortened last record for a truncated gzip
file and reports nothing useful about where a file is broken. So every file is checked
by a pass of our own (sha256, gzip integrity, text/FASTA structure, the sequence
alphabet). `pack` reads with `FastaReader`, whose one decompression both checks the file
and returns its records, with bytes operations only; at the first problem it runs
`check_file`, the same checks with line numbers for the message. `read_records` (used by
the commands that read a few records) streams with pyfastx and cross-checks its record
and base counts against a `check_file` pass. `pack` puts nothing of a file in place before
its check has passed, which is what lets `--skip-bad-files` skip whole files instead of
leaving half of a file in the output.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hyena_glt.alphabet import SeqType, detect_seq_type

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".faa", ".frn", ".fas", ".mfa")
COMPRESSED_SUFFIXES = ("", ".gz", ".bgz", ".gzip")
LIST_SUFFIXES = (".txt", ".list", ".lst", ".fofn")

_READ_CHUNK = 4 << 20
# Caps each decompression step so a file of long N runs (compresses ~1000:1) cannot expand a
# 4 MiB read into gigabytes at once.
_OUT_CHUNK = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}

# Bytes a text file may hold anywhere (headers may carry UTF-8 descriptions).
_TEXT_BYTES = bytes([9, 10, 13, *range(32, 127), *range(128, 256)])
# Bytes a sequence line may hold: letters (IUPAC nucleotides, amino acids), stop '*',
# gaps '-' '.', and line ends (CR of Windows line ends is dropped by the reader).
_SEQ_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz*-.\n\r"


class BadInputError(ValueError):
    """An input that cannot be packed. The message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses from a pack worker to the job
        return BadInputError, (self.path, self.reason)


# ---------------------------------------------------------------------------- discovery


def _is_fasta_name(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(s + c) for s in FASTA_SUFFIXES for c in COMPRESSED_SUFFIXES)


def _expand_one(spec: str, base: Path | None, origin: str, lists: tuple[str, ...] = ()) -> list[Path]:
    if "\0" in spec:  # the OS takes no such name (and glob raises ValueError without saying where it came from)
        raise FileNotFoundError(f"{origin}: a path with a NUL byte: {spec!r}")
    try:
        p = Path(spec).expanduser()
    except RuntimeError:  # '~user/...' of no such user, or no home directory
        raise FileNotFoundError(f"{origin}: cannot expand '~' in {spec!r} (no such user or no home directory)") from None
    if base is not None and not p.is_absolute():
        p = base / p
    try:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_fasta_name(q) and not q.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{origin}: directory {p} holds no FASTA files ({', '.join(FASTA_SUFFIXES)}[.gz])")
            return found
        if p.exists():
            if p.suffix.lower() in LIST_SUFFIXES:
                return _expand_list(p, lists)
            return [p]
    except OSError as e:
        if e.errno is None:  # ours, above
            raise
        # a name too long, a directory that cannot be read, ...: named with where it came from
        raise FileNotFoundError(f"{origin}: cannot use {str(p)[:200]!r}: {e.strerror}") from None
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise FileNotFoundError(f"{origin}: the pattern {spec!r} matches no file")
        return files
    raise FileNotFoundError(f"{origin}: no such file or directory: {p}")


def _expand_list(path: Path, lists: tuple[str, ...] = ()) -> list[Path]:
    key = os.path.realpath(path)
    if key in lists:
        raise BadInputError(path, "a list of input paths that names itself (directly or through another list)")
    out: list[Path] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise BadInputError(path, f"line {n}: not a text list of input paths (binary content)") from None
            if line and not line.startswith("#"):
                out += _expand_one(line, path.parent, f"{path} line {n} (a {path.suffix} INPUT is read as a list of paths)",
                                   (*lists, key))
    if not out:
        raise BadInputError(path, f"no input paths (a {path.suffix} INPUT is read as a list of paths; this one has only "
                                  "blank and '#' lines)")
    return out


def discover_inputs(specs: list[str]) -> list[Path]:
    """FASTA files named by `specs` (files, directories searched recursively, globs, or
    .txt/.list/.lst/.fofn files listing any of these), in the order given with directory
    and glob matches sorted, each file once. Paths are absolute so that every job and the
    manifest name a file the same way."""
    seen: set[str] = set()
    files: list[Path] = []
    for spec in specs:
        for p in _expand_one(spec, None, "input"):
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                files.append(Path(os.path.abspath(p)))
    if not files:
        raise FileNotFoundError("no input files given")
    return files


# ---------------------------------------------------------------------------- checking


@dataclass
class FileCheck:
    path: Path
    size: int
    sha256: str = ""
    compression: str = "none"
    records: int = 0
    bases: int = 0
    error: str | None = None

    def raise_if_bad(self) -> None:
        if self.error:
            raise BadInputError(self.path, self.error)


def sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(18)
    if head.startswith(_GZIP_MAGIC):
        # BGZF (bgzip) is gzip with a 'BC' extra field in every member.
        return "bgzip" if len(head) >= 14 and head[3] & 4 and head[12:14] == b"BC" else "gzip"
    for magic, name in _OTHER_COMPRESSION.items():
        if head.startswith(magic):
            return name
    return "none"


class _Scanner:
    """Walks decompressed FASTA text chunk by chunk, keeping line numbers for messages."""

    def __init__(self) -> None:
        self.line = 1
        self.at_line_start = True
        self.in_header = False
        self.header = bytearray()
        self.records = 0
        self.bases = 0

    def record_id(self) -> str:
        words = bytes(self.header).decode("utf-8", "replace").split()
        return words[0] if words else ""

    def _check_id(self) -> None:
        """The record id (the header's first word) becomes text in the manifest and in every
        output: it must be UTF-8. The rest of the header is not read."""
        if not self.header or self.header[0] in b" \t\r":
            raise ValueError(f"line {self.line}: a header without a record id (the id is the word right after '>')")
        words = bytes(self.header).split(None, 1)
        try:
            words[0].decode("utf-8")
        except UnicodeDecodeError as e:
            if len(self.header) >= 4096 and e.reason == "unexpected end of data":
                return  # an id cut at the 4096 bytes kept
            raise ValueError(f"line {self.line}: the record id is not UTF-8 text (byte 0x{words[0][e.start]:02x} "
                             "in the header)") from None

    def _text_only(self, data: bytes) -> None:
        odd = data.translate(None, _TEXT_BYTES)
        if odd:
            line = self.line + data.count(b"\n", 0, data.index(odd[:1]))
            raise ValueError(f"binary content (byte 0x{odd[0]:02x} at line {line}); not a FASTA text file")

    def feed(self, buf: bytes) -> None:
        # Sequence lines get the (stricter) alphabet check only, so the bulk of the bytes is
        # scanned once; headers and anything before the first record get the text check.
        pos, n = 0, len(buf)
        while pos < n:
            if self.in_header:
                nl = buf.find(b"\n", pos)
                end = n if nl < 0 else nl
                self._text_only(buf[pos:end])
                if len(self.header) < 4096:
                    self.header += buf[pos:end]
                if nl < 0:
                    return
                self._check_id()
                self.in_header, self.at_line_start, self.line, pos = False, True, self.line + 1, nl + 1
                continue
            if self.at_line_start and buf[pos] == 0x3E:  # '>'
                self.records += 1
                self.header = bytearray()
                self.in_header, self.at_line_start, pos = True, False, pos + 1
                continue
            j = buf.find(b"\n>", pos)
            end = n if j < 0 else j + 1
            region = buf[pos:end]
            if self.records == 0:
                self._before_first_record(region)
            else:
                self._sequence(region)
            self.line += region.count(b"\n")
            self.at_line_start = region.endswith(b"\n")
            pos = end

    def _before_first_record(self, region: bytes) -> None:
        self._text_only(region)
        text = region.strip(b" \t\r\n")
        if not text:
            return
        line = self.line + region.count(b"\n", 0, region.index(text[:1]))
        if text.startswith(b"\xef\xbb\xbf"):
            raise ValueError("starts with a UTF-8 byte-order mark; remove it (FASTA must start with '>')")
        if text.startswith(b"@"):
            raise ValueError(f"looks like FASTQ (line {line} starts with '@'); only FASTA is supported")
        first = text.split(b"\n", 1)[0][:40].decode("utf-8", "replace")
        raise ValueError(f"not a FASTA file: line {line} does not start with '>' ({first!r})")

    def _sequence(self, region: bytes) -> None:
        bad = region.translate(None, _SEQ_BYTES)
        if bad:
            self._text_only(region)
            off = region.index(bad[:1])
            line = self.line + region.count(b"\n", 0, off)
            what = {32: "' ' (space)", 9: "'\\t' (tab)"}.get(bad[0]) or (
                repr(chr(bad[0])) if bad[0] < 128 else f"0x{bad[0]:02x} (non-ASCII)"
            )
            raise ValueError(f"record '{self.record_id()}' line {line}: invalid character {what} in the sequence")
        self.bases += len(region) - region.count(b"\n") - region.count(b"\r")

    def finish(self) -> None:
        if self.in_header:  # the last line is a header without a line end
            self._check_id()
        if self.records == 0:
            raise ValueError("empty file (no FASTA records)")


def _decompressed(f, check: FileCheck, hasher, scanner: _Scanner, read_chunk: int = _READ_CHUNK,
                  out_chunk: int = _OUT_CHUNK) -> Iterator[bytes]:
    if check.compression == "none":
        while chunk := f.read(read_chunk):
            hasher.update(chunk)
            yield chunk
        return
    # Several gzip members in a row (bgzip blocks, `cat a.gz b.gz`) form one stream.
    d, members, started, padding = zlib.decompressobj(31), 0, False, False
    while raw := f.read(read_chunk):
        hasher.update(raw)
        data = raw
        while data:
            if padding or (members and not started and data[:1] == b"\0"):
                padding = True  # zero blocks after the last member, as some tools write
                if data.strip(b"\0"):
                    raise ValueError("unexpected data after the end of the gzip stream")
                break
            started = True
            try:
                out = d.decompress(data, out_chunk)
            except zlib.error as e:
                raise ValueError(f"corrupt gzip data ({e}) near line {scanner.line}") from None
            if out:
                yield out
            if d.eof:
                data, d, members, started = d.unused_data, zlib.decompressobj(31), members + 1, False
            else:
                data = d.unconsumed_tail
    if started:
        tail = d.flush()
        if not d.eof:
            raise ValueError(f"truncated gzip file (the compressed stream ends early, after line {scanner.line})")
        yield tail


def check_file(path: Path) -> FileCheck:
    """One pass over `path`: sha256 of its bytes, gzip/bgzip integrity, FASTA structure and
    alphabet. Never raises for bad content: the reason lands in `FileCheck.error`."""
    path = Path(path)
    check = FileCheck(path=path, size=path.stat().st_size)
    hasher = hashlib.sha256()
    scanner = _Scanner()
    try:
        check.compression = sniff_compression(path)
        if check.compression not in ("none", "gzip", "bgzip"):
            check.error = f"compressed with {check.compression}, which the reader does not support; recompress with gzip or bgzip"
        else:
            with open(path, "rb") as f:
                for chunk in _decompressed(f, check, hasher, scanner):
                    scanner.feed(chunk)
            scanner.finish()
    except ValueError as e:
        check.error = str(e)
    except OSError as e:
        check.error = f"cannot read: {e.strerror or e}"
    if check.error:  # hash the rest so the manifest still identifies the file
        try:
            with open(path, "rb") as f:
                hasher = hashlib.sha256()
                while chunk := f.read(_READ_CHUNK):
                    hasher.update(chunk)
        except OSError:
            pass
    check.sha256 = hasher.hexdigest()
    check.records, check.bases = scanner.records, scanner.bases
    return check


def estimate_bases(path: Path) -> int:
    """A cheap guess of a file's uncompressed size, only for the progress bar's ETA."""
    size = path.stat().st_size
    if sniff_compression(path) != "gzip" or size < 18:
        return size
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")  # uncompressed size mod 2**32
    return isize if isize >= size else int(size * 3.5)


# ---------------------------------------------------------------------------- reading


@dataclass
class Record:
    index: int  # position in the file, from 0
    id: str  # first word of the header
    seq: bytes  # bases exactly as in the file (case kept), line ends removed
    seq_type: SeqType


def classify(seq: bytes) -> SeqType:
    """`detect_seq_type` on the set of letters present, without building a set of every
    byte of a chromosome: A, C, G and N do not change the answer (one pass drops them), T
    does (found by a fast search that usually stops early)."""
    rest = seq.translate(None, b"ACGTNacgtn")
    has_t = seq.find(b"T") >= 0 or seq.find(b"t") >= 0
    return detect_seq_type(bytes(frozenset(rest)) + (b"T" if has_t else b""))


def read_records(path: Path, wait_check: Callable[[], FileCheck]) -> Iterator[Record]:
    """Stream the records of `path` with pyfastx (no index file is written) while its
    `check_file` may still be running; `wait_check` returns that check's result. At the end
    (or if pyfastx fails) the file must have passed the check and pyfastx must have
    returned exactly the records and bases the check counted, else BadInputError."""
    import pyfastx

    n = bases = 0
    try:
        for n, (name, seq) in enumerate(pyfastx.Fastx(str(path), format="fasta", uppercase=False), 1):
            raw = seq.encode("ascii")
            del seq  # a chromosome is held once, as bytes, not also as str
            if b"\r" in raw:  # kseq keeps a CR that is not at the end of a line ('\r\n' alone, 'A\rC')
                raw = raw.replace(b"\r", b"")
            bases += len(raw)
            yield Record(n - 1, name, raw, classify(raw))
    except Exception as e:  # pyfastx raises RuntimeError, UnicodeDecodeError, ... on bad files
        wait_check().raise_if_bad()
        raise BadInputError(path, f"reader failed at record {n + 1}: {e}") from None
    check = wait_check()
    check.raise_if_bad()
    if (n, bases) != (check.records, check.bases):
        raise BadInputError(
            path, f"reader returned {n} records / {bases} bases but the file holds {check.records} / {check.bases}"
        )


# What `FastaReader` deletes from every stretch of sequence before looking at what is left:
# the letters of plain nucleotide sequence, so that for DNA the rest (IUPAC codes, U) is a
# few bytes and checking the alphabet and classifying cost one pass.
_COMMON_BASES = b"ACGTNacgtn"
_SEQ_LETTERS = _SEQ_BYTES.replace(b"\n", b"").replace(b"\r", b"")
# pyfastx (kseq) ends a record's name at the first of these.
_NAME_END = re.compile(rb"[ \t\r\v\f]")
# Small steps keep each decompressed piece in the CPU cache for the passes over it.
_FAST_READ_CHUNK, _FAST_OUT_CHUNK = 64 << 10, 1 << 20


class _Unreadable(Exception):
    """Raised inside `FastaReader` at the first sign of a bad file; the message for the
    user comes from `check_file`, which keeps line numbers."""


class FastaReader:
    """The records of one FASTA file in a single pass that is also the file's check: one
    decompression gives the sha256, the gzip integrity, the FASTA structure, the alphabet,
    each record's bases and its seq type, with bytes operations only (no per-base Python).
    It returns the records pyfastx returns (name up to the first blank, case kept, line
    ends removed) and counts the records and bases `check_file` counts.

    Records are yielded before the end of the file is reached, so a consumer must not
    publish anything of the file before the iteration ended without an error. A bad file
    raises BadInputError with `check_file`'s message (line numbers are only counted then, by
    a second pass); `check` then holds that FileCheck, and after a good file the file's."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.check: FileCheck | None = None

    def __iter__(self) -> Iterator[Record]:
        return (rec for rec in self.read(ticks=False))

    def read(self, ticks: bool) -> Iterator[Record | None]:
        """The records; with `ticks`, also None after every decompressed piece (~1 ms of
        work), so that a caller can pause reading at short notice."""
        path = self.path
        try:
            check = FileCheck(path=path, size=path.stat().st_size, compression=sniff_compression(path))
            if check.compression not in ("none", "gzip", "bgzip"):
                raise _Unreadable("unsupported compression")
            hasher = hashlib.sha256()
            parser = _Parser()
            with open(path, "rb") as f:
                chunk_size = _FAST_READ_CHUNK if check.compression != "none" else 4 * _FAST_READ_CHUNK
                for chunk in _decompressed(f, check, hasher, _Scanner(), chunk_size, _FAST_OUT_CHUNK):
                    yield from parser.feed(chunk)
                    if ticks:
                        yield None
            yield from parser.finish()
        except (_Unreadable, ValueError, OSError) as e:
            self.check = check_file(path)
            if not self.check.error:  # only a file that changed while it was read gets here
                self.check.error = f"the file could not be read the same way twice ({e})"
            raise BadInputError(path, self.check.error) from None
        check.sha256, check.records, check.bases = hasher.hexdigest(), parser.records, parser.bases
        self.check = check


class _Parser:
    """FASTA text -> records, chunk by chunk; raises _Unreadable on anything `_Scanner`
    would reject."""

    def __init__(self) -> None:
        self.records = self.bases = 0
        self.in_header, self.at_line_start = False, True
        self.header = bytearray()
        self.name = ""
        self.pieces: list[bytes] = []
        self.letters: set[int] = set()  # letters other than _COMMON_BASES seen in the record
        self.has_t = False

    def feed(self, buf: bytes) -> Iterator[Record]:
        pos, n = 0, len(buf)
        while pos < n:
            if self.in_header:
                nl = buf.find(b"\n", pos)
                end = n if nl < 0 else nl
                part = buf[pos:end]
                if part.translate(None, _TEXT_BYTES):
                    raise _Unreadable("binary content in a header")
                self.header += part
                if nl < 0:
                    return
                self._end_header()
                self.at_line_start, pos = True, nl + 1
                continue
            if self.at_line_start and buf[pos] == 0x3E:  # '>'
                yield from self._end_record()
                self.records += 1
                self.in_header, self.at_line_start, pos = True, False, pos + 1
                continue
            # '>' is no sequence letter, so the first one is either the next record's start
            # or an error; memchr finds it at memory speed.
            j = buf.find(b">", pos)
            if j < 0:
                end = n
            elif j > pos and buf[j - 1] == 0x0A:
                end = j
            else:
                raise _Unreadable("'>' inside a line")
            region = buf if (pos, end) == (0, n) else buf[pos:end]
            self.at_line_start = region.endswith(b"\n")
            pos = end
            if self.records == 0:
                if region.strip(b" \t\r\n"):
                    raise _Unreadable("text before the first record")
                continue
            seq = region.replace(b"\n", b"")
            if b"\r" in seq:
                seq = seq.replace(b"\r", b"")
            rest = seq.translate(None, _COMMON_BASES)
            if rest:
                if rest.translate(None, _SEQ_LETTERS):
                    raise _Unreadable("invalid character in a sequence")
                if len(rest) < 4096:
                    self.letters.update(rest)
                else:  # protein: a count per byte value instead of a set of every letter
                    self.letters.update(np.flatnonzero(np.bincount(np.frombuffer(rest, np.uint8))).tolist())
            if not self.has_t:
                self.has_t = seq.find(b"T") >= 0 or seq.find(b"t") >= 0
            self.pieces.append(seq)
            self.bases += len(seq)

    def _end_header(self) -> None:
        header = bytes(self.header)
        words = header[:4096].split(None, 1)
        try:
            if words:
                words[0].decode("utf-8")
            cut = _NAME_END.search(header)
            self.name = (header if cut is None else header[: cut.start()]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable("a record id that is not UTF-8") from None
        if not self.name:
            raise _Unreadable("a header without a record id")
        self.header = bytearray()
        self.in_header = False

    def _end_record(self) -> Iterator[Record]:
        if self.records == 0:
            return
        seq = self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)
        present = bytes(sorted(self.letters)) + (b"T" if self.has_t else b"")
        yield Record(self.records - 1, self.name, seq, detect_seq_type(present))
        self.pieces, self.letters, self.has_t = [], set(), False

    def finish(self) -> Iterator[Record]:
        if self.in_header:
            self._end_header()
        if self.records == 0:
            raise _Unreadable("no records")
        yield from self._end_record()
