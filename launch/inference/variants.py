"""`hyena-glt score-variants`: zero-shot variant effect scores from a causal language model.

For each ALT allele of each VCF record (multi-allelic records: one row per ALT): the model's
log-likelihood of a window of the genome with the ALT allele, minus that of a window with the
REF allele (`delta = ll_alt - ll_ref`, in nats; negative: the model finds the ALT less likely).

Windows (POS 1-based, p0 = POS - 1, R = len(REF), A = len(ALT), W = --window, n = contig length,
contig[a:b] 0-based half-open; the ALT haplotype is contig[:p0] + ALT + contig[p0+R:]):

  --windows equal (default): each allele in the middle of W bases of its own haplotype,
      start = p0 - (W - len(allele)) // 2, so both windows have W bases whatever the indel
      length. At a contig end the window is moved inward (still W bases, the allele
      off-centre; status `clipped`).
  --windows shared-flanks: the REF window as above; the ALT window has the same flanks,
      contig[start:p0] + ALT + contig[p0+R:end] (W - R + A bases). At a contig end both are
      cut short (status `clipped`).

Why `equal` is the default: a window's log-likelihood is a sum over its bases (about -1.3
nats per base for a model that has learned E. coli), so with shared flanks a deletion of d
bases gains about 1.3 d nats just by being shorter (measured: docs/inference.md). `--per-base`
divides each log-likelihood by its window's length instead. `--strands both` scores each
window and its reverse complement and takes the mean (Evo 2's protocol).

log-likelihood of a window s: sum_i log p(s_i | BOS, s_<i), one forward pass over
input_ids = [BOS] + s[:-1] (as in training), softmax over the whole vocabulary.
`window_log_likelihoods` is the only function that runs the model, so another scorer
(e.g. a streaming or cached one) can replace it.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from launch.args import fraction, nonnegative_int, positive_int

COLUMNS = ["chrom", "pos", "id", "ref", "alt", "win_start", "win_end", "ll_ref", "ll_alt", "delta",
           "status", "message"]
WINDOWS = ("equal", "shared-flanks")
STRANDS = ("forward", "both")

# Rejection reasons, in the order the summary lists them.
REASONS = {
    "unknown_contig": "chromosome not in the reference",
    "outside_contig": "REF runs outside the contig",
    "ref_mismatch": "REF differs from the reference",
    "symbolic_alt": "symbolic, breakend or '*' ALT",
    "no_alt": "ALT is '.'",
    "invalid_allele": "ALT with bases other than A, C, G, T, N",
    "indel_too_long": "allele longer than --max-indel + 1",
    "ref_longer_than_window": "REF longer than --window",
    "alt_longer_than_window": "ALT longer than --window (--windows equal)",
    "window_too_long": "ALT window longer than the model's max_seq_len (--windows shared-flanks)",
    "n_window": "more N in a window than --max-n-fraction",
}
SHOWN_PER_REASON = 5  # per-record messages echoed to stderr for each reason (all are in the TSV)

_BASES = re.compile(rb"^[ACGTN]+$")
_SYMBOLIC = re.compile(r"^<.*>$|[\[\]]|^\.[A-Za-z]+$|^[A-Za-z]+\.$")
_QUAL = re.compile(r"^(\.|[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan|infinity))$", re.IGNORECASE)


# ---------------------------------------------------------------------------- scoring


def window_log_likelihoods(model, seqs: list[bytes], batch_size: int, seq_type: int = 0) -> list[float]:
    """log p(seq) = sum_i log p(seq_i | BOS, seq_<i) for each byte string, from one forward
    pass of the causal LM per batch (hyena_glt.inference.stream_logprobs, the scorer `score`
    uses): input_ids = [BOS] + seq[:-1], labels = seq, log-softmax in fp32. Sequences of equal length
    are batched together (no padding), so results do not depend on the batch. `seq_type`
    (SeqType, DNA by default) is passed to models with a sequence-type embedding. Returns
    floats in the order of `seqs`."""
    import torch

    from hyena_glt import ByteTokenizer
    from hyena_glt.inference import stream_logprobs

    tok = ByteTokenizer()
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(seqs)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError("window_log_likelihoods: empty sequence")
        by_len.setdefault(len(s), []).append(i)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length in sorted(by_len):
                idx = by_len[length]
                for k in range(0, len(idx), batch_size):
                    chunk = idx[k : k + batch_size]
                    ids = torch.stack([tok.encode(seqs[i], add_bos=True).ids for i in chunk]).to(device)
                    st = torch.full((len(chunk),), int(seq_type), dtype=torch.int64, device=device)
                    ll = stream_logprobs(model, ids[:, :-1], ids[:, 1:], None, seq_type=st).double().sum(-1)
                    for i, v in zip(chunk, ll.tolist()):
                        out[i] = float(v)
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------- windows


def variant_windows(contig: bytes, pos: int, ref: bytes, alt: bytes,
                    window: int) -> tuple[bytes, bytes, int, int, str]:
    """`--windows shared-flanks`: (REF window, ALT window, start, end, clipped) for a variant
    at 1-based `pos` whose REF matches `contig`; start/end are the REF window's 0-based
    half-open bounds on the contig (see the module docstring), cut short at a contig end;
    `clipped`: '' or the end(s) cut ('start', 'end', 'both'). Needs len(ref) <= window."""
    p0, r = pos - 1, len(ref)
    left = (window - r) // 2
    right = window - r - left
    start, end = p0 - left, p0 + r + right
    clipped = _ends(start < 0, end > len(contig))
    start, end = max(start, 0), min(end, len(contig))
    ref_win = contig[start:end]
    alt_win = contig[start:p0] + alt + contig[p0 + r : end]
    return ref_win, alt_win, start, end, clipped


def equal_windows(contig: bytes, pos: int, ref: bytes, alt: bytes,
                  window: int) -> tuple[bytes, bytes, int, int, str]:
    """`--windows equal`: (REF window, ALT window, start, end, clipped). Each allele sits in
    the middle of min(W, haplotype length) bases of its own haplotype (the contig with that
    allele), so both windows have W bases; a window that would run past a contig end is
    moved inward. start/end: the REF window's 0-based half-open bounds on the contig.
    `clipped`: '' or the contig end(s) a window meets ('start', 'end', 'both'). Needs
    len(ref), len(alt) <= window."""
    p0, r, a, n = pos - 1, len(ref), len(alt), len(contig)

    def place(allele_len: int, hap_len: int) -> tuple[int, int, bool, bool]:
        length = min(window, hap_len)
        start = p0 - (length - allele_len) // 2
        at_start, at_end = start < 0, start + length > hap_len
        start = min(max(start, 0), hap_len - length)
        return start, start + length, at_start, at_end

    rs, re_, r_lo, r_hi = place(r, n)
    as_, ae, a_lo, a_hi = place(a, n - r + a)

    def hap(lo: int, hi: int) -> bytes:  # the ALT haplotype [lo, hi), without building it whole
        out = contig[lo : min(hi, p0)] if lo < p0 else b""
        out += alt[max(lo - p0, 0) : max(min(hi - p0, a), 0)]
        if hi > p0 + a:
            out += contig[max(lo, p0 + a) - a + r : hi - a + r]
        return out

    return contig[rs:re_], hap(as_, ae), rs, re_, _ends(r_lo or a_lo, r_hi or a_hi)


def _ends(at_start: bool, at_end: bool) -> str:
    return "both" if at_start and at_end else "start" if at_start else "end" if at_end else ""


def reverse_complement(seq: bytes) -> bytes:
    return seq.translate(_COMPLEMENT)[::-1]


_COMPLEMENT = bytes.maketrans(b"ACGTNacgtn", b"TGCANtgcan")


# ---------------------------------------------------------------------------- VCF input


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def scan_vcf(path: Path) -> list[int]:
    """A light pass over the VCF text before the library parses it: the header is there and
    every data line has the 8 fixed columns, an integer POS, a REF and an ALT and a numeric
    or '.' QUAL. Returns the line number of each data line (so a record the library fails on
    can be named by line); raises ValueError naming the file and line otherwise. Needed
    because htslib reports a bad line as e.g. 'truncated file', without a line number."""
    lines: list[int] = []
    seen_fileformat = seen_chrom = False
    n = 0
    try:
        with _open_text(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: line {n}: not UTF-8 text (binary content?)") from None
                if n == 1:
                    if not line.startswith("##fileformat=VCF"):
                        raise ValueError(f"{path}: line 1: not a VCF file (expected '##fileformat=VCFv4.x', "
                                         f"found {line[:40]!r})")
                    seen_fileformat = True
                    continue
                if line.startswith("##"):
                    if seen_chrom:
                        raise ValueError(f"{path}: line {n}: a '##' meta line after the #CHROM header line")
                    continue
                if line.startswith("#"):
                    if seen_chrom:
                        raise ValueError(f"{path}: line {n}: a second header line")
                    cols = line[1:].split("\t")
                    if cols[:8] != ["CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]:
                        raise ValueError(f"{path}: line {n}: the header line must be tab-separated "
                                         "#CHROM POS ID REF ALT QUAL FILTER INFO")
                    seen_chrom = True
                    continue
                if not seen_chrom:
                    raise ValueError(f"{path}: line {n}: a data line before the #CHROM header line")
                if not line.strip():
                    raise ValueError(f"{path}: line {n}: empty line")
                cols = line.split("\t")
                if len(cols) < 8:
                    raise ValueError(f"{path}: line {n}: {len(cols)} tab-separated columns, a VCF record has at "
                                     "least 8 (CHROM POS ID REF ALT QUAL FILTER INFO)")
                chrom, pos, _, ref, alt, qual = cols[:6]
                if not chrom or any(c.isspace() for c in chrom):
                    raise ValueError(f"{path}: line {n}: CHROM {chrom!r} is empty or has white space")
                if not (pos.isascii() and pos.isdigit()):  # str.isdigit() is also true of '²' and '１'
                    raise ValueError(f"{path}: line {n}: POS {pos!r} is not a non-negative integer")
                if not (ref.isascii() and ref.isalpha()):
                    raise ValueError(f"{path}: line {n}: REF {ref!r} is not a string of bases")
                if not alt or any(c.isspace() for c in alt):
                    raise ValueError(f"{path}: line {n}: ALT {alt!r} is empty or has white space")
                if "" in alt.split(","):  # htslib would read the empty allele as '.'
                    raise ValueError(f"{path}: line {n}: ALT {alt!r} has an empty allele")
                if not _QUAL.match(qual):
                    raise ValueError(f"{path}: line {n}: QUAL {qual!r} is neither a number nor '.'")
                lines.append(n)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip data after line {n} ({e})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: cannot read after line {n}: {e}") from None
    if not seen_fileformat:
        raise ValueError(f"{path}: empty file (not a VCF)")
    if not seen_chrom:
        raise ValueError(f"{path}: no #CHROM header line")
    return lines


@dataclass
class VcfRecord:
    line: int
    chrom: str
    pos: int
    id: str
    ref: str
    alts: list[str]


def read_vcf(path: Path, data_lines: list[int]) -> tuple[dict[str, int | None], list[VcfRecord]]:
    """The VCF's ##contig lengths and its records, parsed with pysam (htslib). The i-th
    record is the i-th data line of `scan_vcf`, which gives its line number. htslib reads
    plain and bgzip-compressed VCF; a plain-gzip file (not BGZF, which htslib refuses) is
    decompressed to a temporary file first."""
    from data_tools.fasta import sniff_compression

    if sniff_compression(path) == "gzip":
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="score-variants-") as tmp:
            plain = Path(tmp) / "input.vcf"
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return _read_vcf_htslib(plain, data_lines, path)
    return _read_vcf_htslib(path, data_lines, path)


def _read_vcf_htslib(path: Path, data_lines: list[int], name: Path) -> tuple[dict[str, int | None], list[VcfRecord]]:
    import pysam

    pysam.set_verbosity(0)  # htslib's own warnings (e.g. a contig missing from the header) go unprinted
    try:
        vf = pysam.VariantFile(str(path))
    except (OSError, ValueError, NotImplementedError) as e:
        raise ValueError(f"{name}: cannot parse the VCF header ({e})") from None
    contigs = {c: vf.header.contigs[c].length for c in vf.header.contigs}
    records: list[VcfRecord] = []
    it = iter(vf)
    with vf:
        while True:
            where = (f"line {data_lines[len(records)]}" if len(records) < len(data_lines)
                     else f"after line {data_lines[-1] if data_lines else 0}")
            try:
                rec = next(it)
            except StopIteration:
                break
            except (OSError, ValueError) as e:
                raise ValueError(f"{name}: {where}: the VCF reader (htslib) rejects this record ({e})") from None
            if len(records) >= len(data_lines):
                raise ValueError(f"{name}: {where}: the VCF reader returned more records than the file has lines")
            alts = list(rec.alts) if rec.alts else ["."]
            records.append(VcfRecord(data_lines[len(records)], rec.chrom, rec.pos, rec.id or ".", rec.ref, alts))
    if len(records) != len(data_lines):
        raise ValueError(f"{name}: the VCF reader returned {len(records)} records but the file has "
                         f"{len(data_lines)} data lines")
    return contigs, records


# ---------------------------------------------------------------------------- reference


def read_reference(path: Path) -> dict[str, bytes]:
    """Every record of a FASTA file, upper-cased, in memory (fine for bacterial genomes: E.
    coli is 4.6 MB), keyed by the first word of its header."""
    from data_tools.fasta import check_file, read_records

    check = check_file(path)
    check.raise_if_bad()
    out: dict[str, bytes] = {}
    for rec in read_records(path, lambda: check):
        if rec.id in out:
            raise ValueError(f"{path}: record name {rec.id!r} appears twice")
        out[rec.id] = rec.seq.upper()
    return out


# ---------------------------------------------------------------------------- per-allele checks


@dataclass
class Row:
    chrom: str
    pos: int
    id: str
    ref: str
    alt: str
    status: str = "ok"
    message: str = ""
    win: tuple[int, int] | None = None  # REF window, 0-based half-open
    seqs: tuple[bytes, bytes] | None = None
    ll: tuple[float, float] | None = None

    def fields(self, digits: int = 6) -> list[str]:
        win = [str(self.win[0] + 1), str(self.win[1])] if self.win else ["NA", "NA"]
        if self.ll is not None:
            lr, la = self.ll
            lls = [f"{lr:.{digits}f}", f"{la:.{digits}f}", f"{la - lr:.{digits}f}"]
        else:
            lls = ["NA", "NA", "NA"]
        msg = self.message.replace("\t", " ").replace("\n", " ")
        return [self.chrom, str(self.pos), self.id, self.ref, self.alt, *win, *lls, self.status, msg]


def _short(s: str, n: int = 30) -> str:
    return s if len(s) <= n else f"{s[:n]}...({len(s)} bases)"


@dataclass
class Settings:
    """What decides the windows of an allele (the options of the command)."""

    window: int
    windows: str = "equal"
    max_indel: int = 50
    max_n_fraction: float = 0.1
    max_seq_len: int | None = None  # the model's: longer windows are refused (shared-flanks ALT windows)


def check_allele(rec: VcfRecord, alt: str, reference: dict[str, bytes], settings: Settings) -> Row:
    """The row of one ALT allele: its windows (`seqs`) when it can be scored, else a status
    naming the reason and a message."""
    row = Row(rec.chrom, rec.pos, rec.id, rec.ref, alt)
    where = f"{rec.chrom}:{rec.pos}"
    window = settings.window

    def reject(reason: str, msg: str) -> Row:
        row.status, row.message = reason, f"line {rec.line}: {where} {_short(rec.ref)}>{_short(alt)}: {msg}"
        return row

    if alt in (".", ""):
        return reject("no_alt", "no ALT allele ('.'), nothing to score")
    if alt == "*" or _SYMBOLIC.search(alt):
        return reject("symbolic_alt", f"symbolic or breakend ALT {_short(alt)!r} cannot be written into the sequence")
    ref_b, alt_b = rec.ref.upper().encode(), alt.upper().encode()
    if not _BASES.match(alt_b):
        return reject("invalid_allele", f"ALT {_short(alt)!r} has characters other than A, C, G, T, N")
    contig = reference.get(rec.chrom)
    if contig is None:
        names = list(reference)
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        return reject("unknown_contig", f"chromosome {rec.chrom!r} is not in the reference (it has {shown})")
    longest = max(len(ref_b), len(alt_b)) - 1
    if longest > settings.max_indel:
        return reject("indel_too_long", f"REF {len(ref_b)} and ALT {len(alt_b)} bases: {longest} bases beyond the "
                      f"anchor base, more than --max-indel {settings.max_indel}")
    if len(ref_b) > window:
        return reject("ref_longer_than_window", f"REF of {len(ref_b)} bases does not fit in --window {window}")
    if settings.windows == "equal" and len(alt_b) > window:
        return reject("alt_longer_than_window", f"ALT of {len(alt_b)} bases does not fit in --window {window}")
    end = rec.pos - 1 + len(ref_b)
    if rec.pos < 1:
        return reject("outside_contig", f"POS {rec.pos} is before the start of {rec.chrom} (positions start at 1)")
    if end > len(contig):
        return reject("outside_contig", f"REF spans {rec.pos}-{end} but {rec.chrom} has {len(contig)} bases")
    actual = contig[rec.pos - 1 : end]
    if actual != ref_b:
        return reject("ref_mismatch", f"REF {_short(rec.ref)} does not match the reference, which has "
                      f"{_short(actual.decode())} at {rec.chrom}:{rec.pos}-{end}")
    if settings.windows == "equal":
        ref_win, alt_win, start, stop, ends = equal_windows(contig, rec.pos, ref_b, alt_b, window)
    else:
        ref_win, alt_win, start, stop, ends = variant_windows(contig, rec.pos, ref_b, alt_b, window)
    row.win = (start, stop)
    if settings.max_seq_len is not None and len(alt_win) > settings.max_seq_len:
        return reject("window_too_long", f"ALT window of {len(alt_win)} bases is longer than the model's max_seq_len "
                      f"{settings.max_seq_len} (--window {window} + {len(alt_b) - len(ref_b)} inserted bases): "
                      "use a smaller --window, or --windows equal")
    n_counts = [(w.count(b"N"), len(w), name) for w, name in ((ref_win, "REF"), (alt_win, "ALT"))]
    n, length, name = max(n_counts, key=lambda t: t[0] / t[1])
    if n / length > settings.max_n_fraction:
        return reject("n_window", f"{n} of the {length} bases of the {name} window {rec.chrom}:{start + 1}-{stop} "
                      f"are N ({100 * n / length:.0f}%, more than --max-n-fraction {settings.max_n_fraction:g}): "
                      "too little sequence to score")
    row.seqs = (ref_win, alt_win)
    notes = []
    if ends:
        what = {"start": "the start", "end": "the end", "both": "both ends"}[ends]
        if settings.windows == "equal":
            notes.append(f"window meets {what} of {rec.chrom} ({len(contig)} bases): moved inward, allele off-centre, "
                         f"REF window {start + 1}-{stop}")
        else:
            notes.append(f"window clipped at {what} of {rec.chrom} ({len(contig)} bases): {start + 1}-{stop} "
                         f"({len(ref_win)} of {window} bases)")
        row.status = "clipped"
    if n:
        notes.append(f"{n} N in the {name} window ({100 * n / length:.1f}%)")
    row.message = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------- command


_DESCRIPTION = """\
Zero-shot variant effect scores. For each ALT allele of each VCF record (multi-allelic
records: one output row per ALT): ll_ref and ll_alt, the model's log-likelihoods (nats) of a
window around the REF and around the ALT allele, and delta = ll_alt - ll_ref (< 0: ALT less
likely).

Windows (POS 1-based, p0 = POS-1, R = len(REF), A = len(ALT), W = --window; 0-based slices;
the ALT haplotype is the contig with ALT in place of REF):
  --windows equal (default): each allele in the middle of W bases of its own haplotype,
      from p0 - (W - len(allele)) // 2: REF and ALT windows both have W bases.
  --windows shared-flanks: REF window contig[p0-left : p0+R+right], left = (W-R)//2,
      right = W-R-left; ALT window = the same flanks around ALT (W - R + A bases).
Length effect: a log-likelihood is a sum over bases (about -1.3 nats per base once a model
has learned a genome), so with shared flanks delta falls by about that much per inserted
base and rises per deleted base, whatever the variant does. Equal windows or --per-base
(each ll divided by its window's length, nats per base) remove most of it; the figures
measured on the bundled E. coli variants are in docs/inference.md.
--strands both: the mean over each window and its reverse complement (as Evo 2 scores).
A window meeting a contig end: status 'clipped' (still scored): moved inward with equal
windows, cut short with shared flanks; the message says which end.
W defaults to 1024, or less where a window would not fit the model's max_seq_len: at most
max_seq_len with equal windows, max_seq_len - --max-indel with shared flanks (room for the
longest insertion allowed). A --window over max_seq_len is refused.
ll(window) = sum_i log p(base_i | BOS, bases before i), one forward pass over the window.

Output TSV: '#' lines first (the options in effect and the units: read with
pandas.read_csv(path, sep='\\t', comment='#')), then the columns chrom pos id ref alt
win_start win_end (the REF window, 1-based, inclusive) ll_ref ll_alt delta status message.
status is 'ok', 'clipped' or why the allele was not scored (its scores are NA):
unknown_contig, outside_contig, ref_mismatch, symbolic_alt (<...>, breakends, '*'), no_alt
(ALT '.'), invalid_allele (ALT with other than A/C/G/T/N), indel_too_long (an allele longer
than --max-indel + 1 bases), ref_longer_than_window, alt_longer_than_window,
window_too_long (a shared-flanks ALT window over max_seq_len), n_window (more than
--max-n-fraction of a window is N). The first rejections of each kind are also printed to
stderr, and the last stderr line counts scored and rejected alleles by reason.

A malformed VCF line (too few columns, non-integer POS, ...) stops the run with exit
status 2 and one line naming the file and line; the output is written to a temporary file
and renamed only at the end, so a failed run leaves no output. The reference FASTA is held
in memory, upper-cased (fine for bacterial genomes). Reads .vcf and .vcf.gz (bgzip or gzip).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "score-variants",
        help="zero-shot variant effect: log-likelihood of ALT minus REF windows, per VCF allele, to TSV",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
    )
    p.add_argument("--model", required=True, help="a causal language model directory (either family)")
    p.add_argument("--reference", required=True, help="reference FASTA (.fa/.fasta[.gz]); contig names = first word "
                   "of each header, matched against the VCF's CHROM")
    p.add_argument("--variants", required=True, help="VCF (.vcf, or bgzip/gzip .vcf.gz)")
    p.add_argument("--out", required=True, help="output TSV (written to a temporary file, renamed at the end)")
    p.add_argument("--window", type=positive_int, default=None, help="window length W around each variant, at most "
                   "the model's max_seq_len (default: 1024, or less where the windows would not fit: max_seq_len with "
                   "--windows equal, max_seq_len - --max-indel with shared-flanks)")
    p.add_argument("--windows", choices=WINDOWS, default="equal", help="equal: REF and ALT windows of W bases each, "
                   "each allele centred (default); shared-flanks: the same flanks, so an indel changes the ALT "
                   "window's length (biased by the indel length, see the description)")
    p.add_argument("--per-base", action="store_true", help="divide each log-likelihood by its window's length: "
                   "ll_ref, ll_alt and delta in nats per base")
    p.add_argument("--strands", choices=STRANDS, default="forward", help="both: the mean of the forward and the "
                   "reverse-complement window's scores (default: forward)")
    p.add_argument("--max-indel", type=nonnegative_int, default=50, help="reject alleles longer than this + 1 bases, i.e. "
                   "indels of more than this many bases (default 50)")
    p.add_argument("--max-n-fraction", type=fraction, default=0.1, help="reject (status n_window) an allele whose REF "
                   "or ALT window has more than this share of N (default 0.1)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_score_variants_cmd)


DEFAULT_WINDOW = 1024  # the default W when the model allows it (an Evo 2 import may have max_seq_len 1M)


def default_window(max_seq_len: int, windows: str, max_indel: int) -> int:
    """DEFAULT_WINDOW, or less where the windows would not fit in max_seq_len: equal windows
    have W bases; a shared-flanks ALT window has up to W + max_indel."""
    return min(DEFAULT_WINDOW, max_seq_len if windows == "equal" else max_seq_len - max_indel)


def _score_variants_cmd(args) -> int:
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be at least 1, got {args.window}")
    if args.max_indel < 0:
        raise ValueError(f"--max-indel must be >= 0, got {args.max_indel}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    vcf, fasta, out = Path(args.variants), Path(args.reference), Path(args.out)
    for what, path in (("--variants", vcf), ("--reference", fasta)):
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path}: no such file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist")

    data_lines = scan_vcf(vcf)
    header_contigs, records = read_vcf(vcf, data_lines)
    reference = read_reference(fasta)
    model = _load_model(args)
    max_len = model.config.max_seq_len
    if args.window is None:
        window = default_window(max_len, args.windows, args.max_indel)
        if window < 1:
            raise ValueError(f"--windows shared-flanks: the model's max_seq_len {max_len} leaves no room for "
                             f"--max-indel {args.max_indel}: give a smaller --max-indel or use --windows equal")
    else:
        window = args.window
        if window > max_len:
            raise ValueError(f"--window {window} is longer than the model's max_seq_len {max_len} (the longest "
                             f"context it is meant to see): leave --window out to use {default_window(max_len, args.windows, args.max_indel)}")
    for name, length in header_contigs.items():
        if name in reference and length is not None and length != len(reference[name]):
            print(f"hyena-glt score-variants: warning: {vcf} declares {name} with {length} bases but "
                  f"{fasta} has {len(reference[name])}: is it the same assembly?", file=sys.stderr)

    settings = Settings(window, args.windows, args.max_indel, args.max_n_fraction, max_len)
    rows = [check_allele(rec, alt, reference, settings) for rec in records for alt in rec.alts]
    shown: Counter = Counter()
    for row in rows:
        if row.seqs is None:
            shown[row.status] += 1
            if shown[row.status] <= SHOWN_PER_REASON:
                print(f"hyena-glt score-variants: rejected ({row.status}): {row.message}", file=sys.stderr)
    for reason, n in shown.items():
        if n > SHOWN_PER_REASON:
            print(f"hyena-glt score-variants: ... {n - SHOWN_PER_REASON} more rejected ({reason}); see the status "
                  f"and message columns of {out}", file=sys.stderr)

    _score(args, model, [r for r in rows if r.seqs is not None])
    _write_atomically(out, rows, output_header(args, settings), 8 if args.per_base else 6)

    status = Counter(r.status for r in rows)
    scored = status["ok"] + status["clipped"]
    rejected = len(rows) - scored
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(status.items(), key=lambda kv: _reason_order(kv[0]))
                        if k not in ("ok", "clipped"))
    clipped = f" ({status['clipped']} with windows at a contig end)" if status["clipped"] else ""
    print(f"hyena-glt score-variants: {len(records)} records, {len(rows)} ALT alleles: scored {scored}{clipped}, "
          f"rejected {rejected}{f' ({reasons})' if reasons else ''}; wrote {out}", file=sys.stderr)
    return 0


def output_header(args, settings: Settings) -> list[str]:
    """The '#' lines at the top of the TSV: the options in effect and what the numbers mean."""
    unit = "nats per base (each window's log-likelihood / its length)" if args.per_base else \
        "nats (sum over the window's bases)"
    strands = "mean of the forward and reverse-complement windows" if args.strands == "both" else "forward strand"
    if settings.windows == "equal":
        windows = f"REF and ALT windows of {settings.window} bases each, each allele centred"
    else:
        windows = (f"REF window of {settings.window} bases, ALT window with the same flanks ({settings.window} - "
                   "len(REF) + len(ALT) bases: delta carries about -1.3 nats per inserted base)")
    return [
        (f"# hyena-glt score-variants: score={'per-base' if args.per_base else 'sum'} windows={settings.windows} "
         f"window={settings.window} strands={args.strands} max_indel={settings.max_indel} "
         f"max_n_fraction={settings.max_n_fraction:g}"),
        f"# ll_ref, ll_alt: log-likelihood in {unit}, {strands}; delta = ll_alt - ll_ref",
        f"# windows: {windows}",
        (f"# model={args.model} (max_seq_len {settings.max_seq_len}) reference={args.reference} "
         f"variants={args.variants}"),
    ]


def _reason_order(reason: str) -> tuple[int, str]:
    keys = list(REASONS)
    return (keys.index(reason) if reason in keys else len(keys), reason)


def _load_model(args):
    import torch

    from hyena_glt import load_causal_lm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_causal_lm(args.model, map_location=device).eval()


def _score(args, model, todo: list[Row]) -> None:
    """Fills each row's `ll`: per window, the forward log-likelihood, or with --strands both
    the mean of the forward and the reverse complement's; with --per-base divided by the
    window's length."""
    from tqdm import tqdm

    if not todo:
        return
    both = args.strands == "both"
    # Variants go through in chunks; each chunk's distinct windows are scored once, equal
    # lengths batched together by window_log_likelihoods.
    chunk = max(args.batch_size * 8, 64)
    bar = tqdm(total=len(todo), desc="variants", unit="var", file=sys.stderr, disable=args.no_progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def strands(seq: bytes) -> list[bytes]:
        return [seq, reverse_complement(seq)] if both else [seq]

    try:
        for k in range(0, len(todo), chunk):
            part = todo[k : k + chunk]
            distinct = list(dict.fromkeys(x for r in part for s in r.seqs for x in strands(s)))
            ll = dict(zip(distinct, window_log_likelihoods(model, distinct, args.batch_size)))

            for r in part:
                r.ll = tuple(_combine([ll[x] for x in strands(s)], len(s), args.per_base) for s in r.seqs)
                if not all(math.isfinite(v) for v in r.ll):
                    raise ValueError(f"{r.chrom}:{r.pos} {r.ref}>{r.alt}: the model gave a non-finite log-likelihood")
            bar.update(len(part))
    finally:
        bar.close()


def _combine(lls: list[float], length: int, per_base: bool) -> float:
    """One window's score from its strands' log-likelihoods: their mean, per base if asked."""
    v = sum(lls) / len(lls)
    return v / length if per_base else v


def _write_atomically(out: Path, rows: list[Row], header: list[str] = (), digits: int = 6) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(line + "\n" for line in header)
            f.write("\t".join(COLUMNS) + "\n")
            for r in rows:
                f.write("\t".join(r.fields(digits)) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
