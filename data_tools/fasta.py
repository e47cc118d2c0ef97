"""Finding FASTA inputs, checking them, and reading their records.

pyfastx parses fast, but it silently returns a shortened last record for a truncated gzip
file and reports nothing useful about where a file is broken. So every file gets one
checking pass of our own first (`check_file`: sha256, gzip integrity, text/FASTA
structure, the sequence alphabet, with line numbers), and `read_records` streams it with
pyfastx and cross-checks record and base counts against that pass. The two run side by
side; `pack` writes nothing from a file before its check has passed, which is what lets
`--skip-bad-files` skip whole files instead of leaving half of a file in the output.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from hyena_glt.tokenizer import SeqType, detect_seq_type

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


# ---------------------------------------------------------------------------- discovery


def _is_fasta_name(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(s + c) for s in FASTA_SUFFIXES for c in COMPRESSED_SUFFIXES)


def _expand_one(spec: str, base: Path | None, origin: str) -> list[Path]:
    p = Path(spec).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if q.is_file() and _is_fasta_name(q) and not q.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"{origin}: directory {p} holds no FASTA files ({', '.join(FASTA_SUFFIXES)}[.gz])")
        return found
    if p.exists():
        if p.suffix.lower() in LIST_SUFFIXES:
            return _expand_list(p)
        return [p]
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise FileNotFoundError(f"{origin}: the pattern {spec!r} matches no file")
        return files
    raise FileNotFoundError(f"{origin}: no such file or directory: {p}")


def _expand_list(path: Path) -> list[Path]:
    out: list[Path] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise BadInputError(path, f"line {n}: not a text list of input paths (binary content)") from None
            if line and not line.startswith("#"):
                out += _expand_one(line, path.parent, f"{path} line {n} (a {path.suffix} INPUT is read as a list of paths)")
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
        words = bytes(self.header).split(None, 1)
        if not words:
            return
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
        if self.records == 0:
            raise ValueError("empty file (no FASTA records)")


def _decompressed(f, check: FileCheck, hasher, scanner: _Scanner) -> Iterator[bytes]:
    if check.compression == "none":
        while chunk := f.read(_READ_CHUNK):
            hasher.update(chunk)
            yield chunk
        return
    # Several gzip members in a row (bgzip blocks, `cat a.gz b.gz`) form one stream.
    d, members, started, padding = zlib.decompressobj(31), 0, False, False
    while raw := f.read(_READ_CHUNK):
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
                out = d.decompress(data, _OUT_CHUNK)
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
