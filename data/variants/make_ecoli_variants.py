"""Make `ecoli_w3110_contig.vcf`: real SNVs and short indels between two real E. coli strains.

Inputs (bundled in data/genomes/, also in ../shared/data/genomes/):
  reference  ecoli_k12_w3110.fasta.gz       E. coli K-12 W3110, one record NC_007779.1
  query      ecoli_contig_nmasked.fasta.gz  a metagenomic contig of another E. coli strain,
                                            about half of it one run of N

Method:
  1. The query is cut at its runs of N; each N-free segment is aligned to the reference with
     minimap2 (its Python binding `mappy`, preset asm20: assembly vs a reference of a few
     per cent divergence), asking for the cs tag (the alignment's differences, in reference
     orientation whatever the strand).
  2. Only primary hits with mapping quality >= 60 are kept, and a hit whose reference span
     overlaps an already kept hit is dropped, so each reference base is covered at most once.
  3. Every cs operation becomes a difference: `*xy` a SNV, `+seq` an insertion, `-seq` a
     deletion. Indels get VCF's anchor base (the reference base before them) and are
     left-aligned (shifted left while the allele can be rotated through the reference), as
     `bcftools norm` does. Differences touching an N of the query are skipped.
  4. Check: applying all differences of a hit to the reference span reproduces the aligned
     query bases exactly (reverse-complemented for minus-strand hits).
  5. Selection, to keep the fixture small (< 100 KB): every indel of at most MAX_INDEL bases,
     and every SNV_STEP-th SNV in reference order. The output is sorted by position.

Output: a VCFv4.2 file with ##contig (name and length of the reference record) and ##source
headers; ID is `ecw<n>`; INFO holds the query position (QPOS, 1-based, of the first ALT
base, or of the base before an insertion/deletion point) and strand of the hit (QSTRAND).

Regenerate (from the repository root; mappy is only needed here, not by the project):
    .venv/bin/pip install "mappy>=2.24"
    .venv/bin/python data/variants/make_ecoli_variants.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"
QUERY = REPO / "data" / "genomes" / "ecoli_contig_nmasked.fasta.gz"
OUT = HERE / "ecoli_w3110_contig.vcf"
PRESET = "asm20"
MIN_MAPQ = 60
MAX_INDEL = 50
SNV_STEP = 60

_COMP = bytes.maketrans(b"ACGTN", b"TGCAN")


def revcomp(s: str) -> str:
    return s.encode().translate(_COMP)[::-1].decode()


def read_one(path: Path) -> tuple[str, str]:
    from data_tools.fasta import check_file, read_records

    check = check_file(path)
    check.raise_if_bad()
    recs = list(read_records(path, lambda: check))
    if len(recs) != 1:
        raise SystemExit(f"{path}: expected one record, found {len(recs)}")
    return recs[0].id, recs[0].seq.decode().upper()


def left_align(ref: str, pos: int, r: str, a: str) -> tuple[int, str, str]:
    """Normalize a VCF allele pair (pos 0-based of r's first base): trim common suffixes,
    extending to the left with reference bases when an allele empties; then trim common
    prefixes while both alleles keep at least one base."""
    while True:
        if r and a and r[-1] == a[-1]:
            r, a = r[:-1], a[:-1]
        elif not r or not a:
            if pos == 0:
                break
            pos -= 1
            r, a = ref[pos] + r, ref[pos] + a
        else:
            break
    while len(r) > 1 and len(a) > 1 and r[0] == a[0]:
        r, a, pos = r[1:], a[1:], pos + 1
    return pos, r, a


def calls_of_hit(ref: str, hit, qseq: str, qoff: int) -> list[tuple[int, str, str, int]]:
    """(pos0, REF, ALT, query position 1-based) for each difference in the hit's cs tag."""
    out = []
    r = hit.r_st
    q_aln = qseq[hit.q_st : hit.q_en]
    q_ref_orient = q_aln if hit.strand == 1 else revcomp(q_aln)
    qi = 0  # offset in q_ref_orient
    for op, arg in re.findall(r"([:*+\-~])([0-9a-z]+)", hit.cs):
        # query position (1-based, in the original contig) of offset qi in reference orientation
        def qpos(k: int) -> int:
            return qoff + (hit.q_st + k if hit.strand == 1 else hit.q_en - 1 - k) + 1

        if op == ":":
            n = int(arg)
            r += n
            qi += n
        elif op == "*":
            rb, qb = arg[0].upper(), arg[1].upper()
            assert ref[r] == rb, (r, rb, ref[r])
            if qb != "N":
                out.append((r, rb, qb, qpos(qi)))
            r += 1
            qi += 1
        elif op == "+":
            ins = arg.upper()
            if "N" not in ins:
                out.append((r - 1, ref[r - 1], ref[r - 1] + ins, qpos(qi)))
            qi += len(ins)
        elif op == "-":
            dele = arg.upper()
            assert ref[r : r + len(dele)] == dele
            out.append((r - 1, ref[r - 1] + dele, ref[r - 1], qpos(qi)))
            r += len(dele)
        else:
            raise SystemExit(f"unexpected cs operation {op!r}")
    assert r == hit.r_en and qi == len(q_ref_orient), "cs tag does not cover the hit"
    # Check: the differences applied to the reference span give the aligned query bases
    # (SNVs at query N were skipped, so compare with N positions masked).
    pieces, at = [], hit.r_st
    for p, rb, ab, _ in out:
        pieces.append(ref[at:p])
        pieces.append(ab)
        at = p + len(rb)
    pieces.append(ref[at : hit.r_en])
    rebuilt = "".join(pieces)
    if "N" not in q_ref_orient:
        assert rebuilt == q_ref_orient, "differences do not reproduce the query"
    else:
        assert len(rebuilt) == len(q_ref_orient)
    return out


def main() -> None:
    import mappy

    ref_name, ref = read_one(REFERENCE)
    q_name, query = read_one(QUERY)
    aligner = mappy.Aligner(seq=ref, preset=PRESET)
    if not aligner:
        raise SystemExit("mappy could not index the reference")
    kept_spans: list[tuple[int, int]] = []
    calls: list[tuple[int, str, str, int, str]] = []
    for seg in re.finditer(r"[^N]+", query):
        qseq = seg.group()
        for hit in aligner.map(qseq, cs=True):
            if not hit.is_primary or hit.mapq < MIN_MAPQ:
                continue
            if any(hit.r_st < e and s < hit.r_en for s, e in kept_spans):
                continue
            kept_spans.append((hit.r_st, hit.r_en))
            strand = "+" if hit.strand == 1 else "-"
            for p, rb, ab, qp in calls_of_hit(ref, hit, qseq, seg.start()):
                calls.append((p, rb, ab, qp, strand))
    # Left-align indels (SNVs are unchanged by it), then select.
    normed = []
    for p, rb, ab, qp, strand in calls:
        if len(rb) != len(ab):
            p, rb, ab = left_align(ref, p, rb, ab)
        normed.append((p, rb, ab, qp, strand))
    normed.sort()
    snvs = [c for c in normed if len(c[1]) == len(c[2]) == 1]
    indels = [c for c in normed if len(c[1]) != len(c[2])]
    short = [c for c in indels if max(len(c[1]), len(c[2])) - 1 <= MAX_INDEL]
    chosen = sorted(set(snvs[::SNV_STEP]) | set(short))
    lines = [
        "##fileformat=VCFv4.2",
        f"##source=data/variants/make_ecoli_variants.py (minimap2/mappy {PRESET}, cs tag; "
        f"query {QUERY.name} record {q_name} against {REFERENCE.name})",
        f"##reference={REFERENCE.name}",
        f"##contig=<ID={ref_name},length={len(ref)}>",
        '##INFO=<ID=QPOS,Number=1,Type=Integer,Description="Position in the query contig (1-based)">',
        '##INFO=<ID=QSTRAND,Number=1,Type=String,Description="Strand of the query alignment (+ or -)">',
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
    ]
    for n, (p, rb, ab, qp, strand) in enumerate(chosen, 1):
        assert ref[p : p + len(rb)] == rb
        lines.append(f"{ref_name}\t{p + 1}\tecw{n}\t{rb}\t{ab}\t.\tPASS\tQPOS={qp};QSTRAND={strand}")
    OUT.write_text("\n".join(lines) + "\n")
    n_snv = sum(1 for c in chosen if len(c[1]) == 1 == len(c[2]))
    n_ins = sum(1 for c in chosen if len(c[2]) > len(c[1]))
    n_del = sum(1 for c in chosen if len(c[1]) > len(c[2]))
    print(f"hits kept: {len(kept_spans)}, reference bases covered: {sum(e - s for s, e in kept_spans):,}")
    print(f"differences found: {len(snvs)} SNVs, {len(indels)} indels ({len(short)} of <= {MAX_INDEL} bases)")
    print(f"wrote {OUT.relative_to(REPO)}: {len(chosen)} records ({n_snv} SNVs, {n_ins} insertions, "
          f"{n_del} deletions), {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
