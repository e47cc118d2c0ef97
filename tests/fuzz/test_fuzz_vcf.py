"""Fuzzing the VCF reader of `hyena-glt score-variants` (launch/inference/variants.py: `scan_vcf`,
then `read_vcf`, which parses with pysam/htslib and names records by the scan's line numbers).

Inputs: VCF files generated from records (contig lines, INFO definitions, multi-allelic,
symbolic and '.' ALTs, numeric or '.' QUAL), damaged byte by byte, a quarter gzipped. Properties:
what loads is what the text says (CHROM, POS, ID, REF, ALTs of every data line, in order, read
independently here); anything else is one line naming the file, and `score-variants` exits 2
with it before it loads a model.
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

from launch.inference.variants import read_vcf, scan_vcf

CONTIGS = {"chr1": 5000, "NC_000913.3": 4641652, "x": 50}

# A warning the reader lets through is printed by the command: a failure here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")


@st.composite
def vcf_file(draw) -> bytes:
    lines = ["##fileformat=VCFv4.2"]
    contigs = draw(st.lists(st.sampled_from(sorted(CONTIGS)), min_size=1, max_size=3, unique=True))
    lines += [f"##contig=<ID={c},length={CONTIGS[c]}>" for c in contigs]
    if draw(st.booleans()):
        lines.append('##INFO=<ID=DP,Number=1,Type=Integer,Description="Total depth">')
    lines.append('##FILTER=<ID=q10,Description="Quality below 10">')
    lines.append("#" + "\t".join(["CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]))
    alleles = st.text("ACGTN", min_size=1, max_size=6)
    for _ in range(draw(st.integers(0, 6))):
        chrom = draw(st.sampled_from(contigs))
        pos = draw(st.integers(1, CONTIGS[chrom]))
        vid = draw(st.sampled_from([".", "rs1", "v;w"]))
        ref = draw(alleles)
        alt = draw(st.one_of(st.lists(alleles, min_size=1, max_size=3).map(",".join),
                             st.sampled_from([".", "<DEL>", "*", "A,<NON_REF>"])))
        qual = draw(st.sampled_from([".", "30", "0.5", "1e3", "99"]))
        filt = draw(st.sampled_from(["PASS", ".", "q10"]))
        info = draw(st.sampled_from([".", "DP=7", "DP=0"]))
        lines.append("\t".join([chrom, str(pos), vid, ref, alt, qual, filt, info]))
    return ("\n".join(lines) + "\n").encode()


def _expected(raw: bytes, data_lines: list[int]) -> list[tuple]:
    """(line, CHROM, POS, ID, REF, ALTs) of each data line, read from the text here."""
    import gzip

    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8").split("\n")
    out = []
    for n in data_lines:
        cols = text[n - 1].rstrip("\r").split("\t")
        alts = ["."] if cols[4] == "." else cols[4].split(",")
        out.append((n, cols[0], int(cols[1]), cols[2], cols[3], alts))
    return out


def _load(path):
    lines = scan_vcf(path)
    return lines, read_vcf(path, lines)


@budget(25)
@given(vcf_file())
def test_undamaged_vcf_loads_as_written(raw):
    with scratch() as d:
        path = d / "in.vcf"
        path.write_bytes(raw)
        lines, (contigs, records) = _load(path)
        got = [(r.line, r.chrom, r.pos, r.id, r.ref, r.alts) for r in records]
        assert got == _expected(raw, lines)
        assert all(contigs[c] == CONTIGS[c] for c in contigs)


@budget(60)
@given(maybe_gzipped(damaged(vcf_file())))
def test_damaged_vcf_loads_as_written_or_refused_in_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("in.vcf.gz" if gz else "in.vcf")
        path.write_bytes(raw)
        try:
            lines, (_, records) = _load(path)
        except ValueError as e:
            assert str(e).startswith(f"{path}: "), str(e)
            mapped_error(e, path, variants=str(path))
            return
        got = [(r.line, r.chrom, r.pos, r.id, r.ref, r.alts) for r in records]
        assert got == _expected(raw, lines), "the VCF reader returned other records than the file's text"


@budget(25)
@given(maybe_gzipped(damaged(vcf_file())))
def test_score_variants_refuses_a_bad_vcf_in_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("in.vcf.gz" if gz else "in.vcf")
        path.write_bytes(raw)
        try:
            _load(path)
            return  # loads: the command goes on to the reference and the model
        except ValueError:
            pass
        ref = d / "ref.fa"
        ref.write_bytes(b">chr1\nACGT\n")
        rc, _, err = run_cli("score-variants", "--model", d / "no-model", "--reference", ref, "--variants", path,
                             "--out", d / "out.tsv")
        assert_one_line_error(rc, err, "score-variants", path)
        assert not (d / "out.tsv").exists()


# ---------------------------------------------------------------------------- found by fuzzing

_HEADER = "##fileformat=VCFv4.2\n##contig=<ID=chr1,length=5000>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


@pytest.mark.parametrize("line, what", [
    ("chr1\t\u00b2\t.\tA\tC\t.\t.\t.", "POS '\u00b2' is not a non-negative integer"),  # htslib: 'truncated file'
    ("chr1\t\uff15\t.\tA\tC\t.\t.\t.", "POS '\uff15' is not a non-negative integer"),
    ("chr1\t5\t.\t\u00e9\tC\t.\t.\t.", "REF '\u00e9' is not a string of bases"),
    ("chr1\t5\t.\tA\tA,\t.\t.\t.", "ALT 'A,' has an empty allele"),  # htslib read it as ['A', '.']
    ("chr1\t5\t.\tA\t,C\t.\t.\t.", "ALT ',C' has an empty allele"),
])
def test_vcf_lines_htslib_misreads_are_refused_by_the_scan(tmp_path, line, what):
    path = tmp_path / "v.vcf"
    path.write_text(_HEADER + line + "\n")
    with pytest.raises(ValueError) as e:
        _load(path)
    assert str(e.value) == f"{path}: line 4: {what}"
