"""`hyena-glt score-variants`: zero-shot variant effect scores from a causal language model.

For each ALT allele of each VCF record: the model's log-likelihood of a window of the
reference with the ALT allele substituted, minus that of the same window with the REF allele
(`delta = ll_alt - ll_ref`, in nats; negative: the model finds the ALT sequence less likely).

Window (POS 1-based, R = len(REF), A = len(ALT), W = --window, contig[a:b] 0-based half-open):
    left  = (W - R) // 2        right = W - R - left
    start = POS - 1 - left      end   = POS - 1 + R + right
    REF window = contig[start:end]                                      (W bases)
    ALT window = contig[start:POS-1] + ALT + contig[POS-1+R:end]       (W - R + A bases)
Both windows share the same flanks; an indel changes only the ALT window's length. A window
that runs past a contig end is clipped there (status `clipped`, still scored).

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

from launch.args import nonnegative_int, positive_int

COLUMNS = ["chrom", "pos", "id", "ref", "alt", "win_start", "win_end", "ll_ref", "ll_alt", "delta",
           "status", "message"]

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
                    window: int) -> tuple[bytes, bytes, int, int, bool]:
    """(REF window, ALT window, start, end, clipped) for a variant at 1-based `pos` whose REF
    matches `contig`; start/end are the REF window's 0-based half-open bounds on the contig
    (see the module docstring). Needs len(ref) <= window."""
    p0, r = pos - 1, len(ref)
    left = (window - r) // 2
    right = window - r - left
    start, end = p0 - left, p0 + r + right
    clipped = start < 0 or end > len(contig)
    start, end = max(start, 0), min(end, len(contig))
    ref_win = contig[start:end]
    alt_win = contig[start:p0] + alt + contig[p0 + r : end]
    return ref_win, alt_win, start, end, clipped


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
                if not pos.isdigit():
                    raise ValueError(f"{path}: line {n}: POS {pos!r} is not a non-negative integer")
                if not ref or not ref.isalpha():
                    raise ValueError(f"{path}: line {n}: REF {ref!r} is not a string of bases")
                if not alt or any(c.isspace() for c in alt):
                    raise ValueError(f"{path}: line {n}: ALT {alt!r} is empty or has white space")
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

    def fields(self) -> list[str]:
        win = [str(self.win[0] + 1), str(self.win[1])] if self.win else ["NA", "NA"]
        if self.ll is not None:
            lr, la = self.ll
            lls = [f"{lr:.6f}", f"{la:.6f}", f"{la - lr:.6f}"]
        else:
            lls = ["NA", "NA", "NA"]
        msg = self.message.replace("\t", " ").replace("\n", " ")
        return [self.chrom, str(self.pos), self.id, self.ref, self.alt, *win, *lls, self.status, msg]


def _short(s: str, n: int = 30) -> str:
    return s if len(s) <= n else f"{s[:n]}...({len(s)} bases)"


def check_allele(rec: VcfRecord, alt: str, reference: dict[str, bytes], window: int, max_indel: int) -> Row:
    row = Row(rec.chrom, rec.pos, rec.id, rec.ref, alt)
    where = f"{rec.chrom}:{rec.pos}"

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
    if longest > max_indel:
        return reject("indel_too_long", f"REF {len(ref_b)} and ALT {len(alt_b)} bases: {longest} bases beyond the "
                      f"anchor base, more than --max-indel {max_indel}")
    if len(ref_b) > window:
        return reject("ref_longer_than_window", f"REF of {len(ref_b)} bases does not fit in --window {window}")
    end = rec.pos - 1 + len(ref_b)
    if rec.pos < 1:
        return reject("outside_contig", f"POS {rec.pos} is before the start of {rec.chrom} (positions start at 1)")
    if end > len(contig):
        return reject("outside_contig", f"REF spans {rec.pos}-{end} but {rec.chrom} has {len(contig)} bases")
    actual = contig[rec.pos - 1 : end]
    if actual != ref_b:
        return reject("ref_mismatch", f"REF {_short(rec.ref)} does not match the reference, which has "
                      f"{_short(actual.decode())} at {rec.chrom}:{rec.pos}-{end}")
    ref_win, alt_win, start, stop, clipped = variant_windows(contig, rec.pos, ref_b, alt_b, window)
    row.win, row.seqs = (start, stop), (ref_win, alt_win)
    if clipped:
        row.status = "clipped"
        row.message = f"window clipped at the end of {rec.chrom} ({len(contig)} bases): {start + 1}-{stop}"
    return row


# ---------------------------------------------------------------------------- command


_DESCRIPTION = """\
Zero-shot variant effect scores. For each ALT allele of each VCF record (one output row
per ALT): ll_ref and ll_alt, the model's log-likelihoods (nats) of a reference window with
the REF and with the ALT allele, and delta = ll_alt - ll_ref (< 0: ALT less likely).

Window (POS 1-based, R = len(REF), A = len(ALT), W = --window; 0-based half-open slices):
  left = (W - R) // 2, right = W - R - left
  REF window = contig[POS-1-left : POS-1+R+right]                          W bases
  ALT window = contig[POS-1-left : POS-1] + ALT + contig[POS-1+R : POS-1+R+right]
                                                                            W - R + A bases
Both windows share the same flanks: an indel changes the ALT window's length only.
A window running past a contig end is clipped there (status 'clipped', still scored).
ll(window) = sum_i log p(base_i | BOS, bases before i), one forward pass over the window.

Output TSV columns: chrom pos id ref alt win_start win_end (the REF window, 1-based,
inclusive) ll_ref ll_alt delta status message. status is 'ok', 'clipped' or why the
allele was not scored (its scores are NA): unknown_contig, outside_contig, ref_mismatch,
symbolic_alt (<...>, breakends, '*'), no_alt (ALT '.'), invalid_allele (ALT with other
than A/C/G/T/N), indel_too_long (an allele longer than --max-indel + 1 bases),
ref_longer_than_window. The first rejections of each kind are also printed to stderr, and
the last stderr line counts scored and rejected alleles by reason.

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
    p.add_argument("--window", type=positive_int, default=1024, help="reference window length W around each variant "
                   "(default 1024)")
    p.add_argument("--max-indel", type=nonnegative_int, default=50, help="reject alleles longer than this + 1 bases, i.e. "
                   "indels of more than this many bases (default 50)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_score_variants_cmd)


def _score_variants_cmd(args) -> int:
    if args.window < 1:
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
    for name, length in header_contigs.items():
        if name in reference and length is not None and length != len(reference[name]):
            print(f"hyena-glt score-variants: warning: {vcf} declares {name} with {length} bases but "
                  f"{fasta} has {len(reference[name])}: is it the same assembly?", file=sys.stderr)

    rows = [check_allele(rec, alt, reference, args.window, args.max_indel) for rec in records for alt in rec.alts]
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
    _write_atomically(out, rows)

    status = Counter(r.status for r in rows)
    scored = status["ok"] + status["clipped"]
    rejected = len(rows) - scored
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(status.items(), key=lambda kv: _reason_order(kv[0]))
                        if k not in ("ok", "clipped"))
    clipped = f" ({status['clipped']} with windows clipped at a contig end)" if status["clipped"] else ""
    print(f"hyena-glt score-variants: {len(records)} records, {len(rows)} ALT alleles: scored {scored}{clipped}, "
          f"rejected {rejected}{f' ({reasons})' if reasons else ''}; wrote {out}", file=sys.stderr)
    return 0


def _reason_order(reason: str) -> tuple[int, str]:
    keys = list(REASONS)
    return (keys.index(reason) if reason in keys else len(keys), reason)


def _load_model(args):
    import torch

    from hyena_glt import load_causal_lm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_causal_lm(args.model, map_location=device).eval()


def _score(args, model, todo: list[Row]) -> None:
    from tqdm import tqdm

    if not todo:
        return
    longest = max(len(s) for r in todo for s in r.seqs)
    if longest > model.config.max_seq_len:
        print(f"hyena-glt score-variants: warning: windows of up to {longest} bases are longer than the model's "
              f"max_seq_len {model.config.max_seq_len}", file=sys.stderr)
    # Variants go through in chunks; each chunk's distinct windows are scored once, equal
    # lengths batched together by window_log_likelihoods.
    chunk = max(args.batch_size * 8, 64)
    bar = tqdm(total=len(todo), desc="variants", unit="var", file=sys.stderr, disable=args.no_progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for k in range(0, len(todo), chunk):
            part = todo[k : k + chunk]
            distinct = list(dict.fromkeys(s for r in part for s in r.seqs))
            ll = dict(zip(distinct, window_log_likelihoods(model, distinct, args.batch_size)))
            for r in part:
                r.ll = (ll[r.seqs[0]], ll[r.seqs[1]])
                if not all(math.isfinite(v) for v in r.ll):
                    raise ValueError(f"{r.chrom}:{r.pos} {r.ref}>{r.alt}: the model gave a non-finite log-likelihood")
            bar.update(len(part))
    finally:
        bar.close()


def _write_atomically(out: Path, rows: list[Row]) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write("\t".join(COLUMNS) + "\n")
            for r in rows:
                f.write("\t".join(r.fields()) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
