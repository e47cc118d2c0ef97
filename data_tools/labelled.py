"""Small labelled-sequence files for fine-tuning: CSV/TSV (`sequence,label`) or FASTA with the
label in the header. Plain or gzip (detected by magic bytes).

* CSV / TSV: a header naming `sequence` (or `seq`) and `label` (or `target`, `y`) columns, and
  optionally `id` (or `name`); without a header, column 1 is the sequence and column 2 the
  label. The delimiter is `,` for .csv, a tab for .tsv/.tab/.txt, else sniffed.
* FASTA: `>id label=X ...`, `>id|X` or `>id X` (the last field after `|` or whitespace).

A label is kept as the string it is in the file; what it means for each task kind (a class
name, per-base labels `00111000` or space-separated tokens, a number) is hyena_glt.labels.
Errors are ValueErrors naming the file and line (bytes that are not UTF-8, a corrupt gzip
stream and malformed CSV included).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

FASTA_SUFFIXES = {".fa", ".fasta", ".fna", ".fas", ".ffn", ".faa"}
_SEQ_RE = re.compile(r"^[A-Za-z*.\-]+$")
_SEQ_COLS, _LABEL_COLS, _ID_COLS = ("sequence", "seq"), ("label", "labels", "target", "y"), ("id", "name")


@dataclass
class LabelledRecord:
    id: str
    sequence: str
    label: str | None
    line: int | None = None  # the line of the file it came from (a FASTA record: its header)


def _read_text(path: Path) -> str:
    """The whole file as text (plain or gzip; a UTF-8 byte-order mark is dropped). The files
    are small; reading them at once lets a bad byte be named by line."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _kind(path: Path, first_line: str) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in FASTA_SUFFIXES or first_line.startswith(">"):
        return "fasta"
    if suffix == ".csv":
        return ","
    if suffix in (".tsv", ".tab", ".txt"):
        return "\t"
    return "\t" if "\t" in first_line else ","


def _check_seq(seq: str, where: str) -> str:
    if not seq or not _SEQ_RE.match(seq):
        shown = seq if len(seq) <= 30 else seq[:30] + "..."
        raise ValueError(f"{where}: not a sequence: {shown!r} (letters, '-', '*', '.' only)")
    return seq


def _fasta_label(header: str) -> tuple[str, str | None]:
    m = re.search(r"(?:^|\s)label=(\S+)", header)
    name = header.split()[0].split("|")[0] if header.split() else ""
    if m:
        return name, m.group(1)
    if "|" in header:
        return name, header.rsplit("|", 1)[1].strip() or None
    parts = header.split()
    return name, (parts[-1] if len(parts) > 1 else None)


def _read_fasta(f, path: Path) -> list[LabelledRecord]:
    out, header, chunks, start = [], None, [], 0

    def flush():
        if header is not None:
            name, label = _fasta_label(header)
            out.append(LabelledRecord(name or f"seq{len(out) + 1}", _check_seq("".join(chunks), f"{path}:{start}"), label,
                                      start))

    for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            flush()
            header, chunks, start = line[1:].strip(), [], n
        elif header is None:
            raise ValueError(f"{path}:{n}: FASTA must start with a '>' header line")
        else:
            chunks.append(line)
    flush()
    return out


def _read_table(f: io.StringIO, path: Path, delimiter: str) -> list[LabelledRecord]:
    reader = csv.reader(f, delimiter=delimiter)
    rows = []
    limit = csv.field_size_limit()  # 128 KiB by default: a longer sequence is no error
    csv.field_size_limit(max(limit, len(f.getvalue()) + 1))
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, r))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} line ({e})") from None
    finally:
        csv.field_size_limit(limit)
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0][1]]
    if any(c in _SEQ_COLS for c in head):
        seq_i = next(i for i, c in enumerate(head) if c in _SEQ_COLS)
        label_i = next((i for i, c in enumerate(head) if c in _LABEL_COLS), None)
        id_i = next((i for i, c in enumerate(head) if c in _ID_COLS), None)
        rows = rows[1:]
    else:
        seq_i, label_i, id_i = 0, (1 if len(rows[0][1]) > 1 else None), None
    out = []
    for n, r in rows:
        where = f"{path}:{n}"
        if seq_i >= len(r):
            raise ValueError(f"{where}: expected a sequence in column {seq_i + 1}, got {len(r)} column(s)")
        label = r[label_i].strip() if label_i is not None and label_i < len(r) and r[label_i].strip() else None
        rid = r[id_i].strip() if id_i is not None and id_i < len(r) else f"seq{len(out) + 1}"
        out.append(LabelledRecord(rid, _check_seq(r[seq_i].strip(), where), label, n))
    return out


def read_labelled(path: str | Path, require_labels: bool = True) -> list[LabelledRecord]:
    """Records of a CSV/TSV/FASTA file; with require_labels, every record must have a label."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    kind = _kind(path, first)
    lines = io.StringIO(text, newline="")  # csv wants the line ends as they are
    records = _read_fasta(lines, path) if kind == "fasta" else _read_table(lines, path, kind)
    if not records:
        raise ValueError(f"{path}: no sequences found")
    if require_labels:
        missing = [r.id for r in records if r.label is None]
        if missing:
            raise ValueError(f"{path}: {len(missing)} record(s) without a label (first: {missing[0]}); "
                             "expected a label column or FASTA headers like '>id label=X'")
    return records

