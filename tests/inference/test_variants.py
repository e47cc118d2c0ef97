"""`hyena-glt score-variants`: ALT-minus-REF window log-likelihoods per VCF allele.

The expected numbers are computed here, independently of launch/inference/variants.py: the windows are
cut from the reference as docs/inference.md defines them (`--windows equal`: each allele in the
middle of W bases of its own haplotype; `--windows shared-flanks`: the same flanks), and each
window is scored alone with one forward pass of the model over [BOS] + window.
"""

from __future__ import annotations

import csv
import gzip
import math
import random
from pathlib import Path

import pytest
import torch

from hyena_glt import HyenaGLTConfig, build_causal_lm, load_causal_lm
from hyena_glt.tokenizer import BOS_ID, NUM_SPECIAL
from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
REAL_VCF = REPO / "data" / "variants" / "ecoli_w3110_contig.vcf"
SMALL = dict(pattern="S*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16, modal_order=4,
             max_seq_len=256, seed=3)
MERGING = dict(patching="entropy", patch_size=4, max_patch=8, local_encoder_pattern="S", local_decoder_pattern="S",
               entropy_d_model=16, entropy_pattern="S")
HEADER = "##fileformat=VCFv4.2\n{contigs}#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("varmodel") / "lm"
    build_causal_lm(HyenaGLTConfig(**SMALL)).save_pretrained(d)
    return d


def read_fasta_gz(path: Path) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    name = None
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                name = line[1:].split()[0]
                out[name] = []
            elif line:
                out[name].append(line.upper())
    return {k: "".join(v) for k, v in out.items()}


def expected_windows(contig: str, pos: int, ref: str, alt: str, w: int) -> tuple[str, str, int, int]:
    """`--windows shared-flanks`: REF in the middle of W bases, left flank (W - len(REF)) // 2,
    ALT window = same flanks around ALT; clipped at the contig ends. Returns 1-based
    inclusive bounds of the REF window."""
    lo = pos - 1 - (w - len(ref)) // 2
    hi = lo + w
    lo, hi = max(lo, 0), min(hi, len(contig))
    assert contig[pos - 1 : pos - 1 + len(ref)] == ref
    return contig[lo:hi], contig[lo : pos - 1] + alt + contig[pos - 1 + len(ref) : hi], lo + 1, hi


def expected_equal_windows(contig: str, pos: int, ref: str, alt: str, w: int) -> tuple[str, str, int, int]:
    """`--windows equal` (the default): on each haplotype (the contig, and the contig with
    ALT in place of REF), the allele in the middle of W bases, (W - len(allele)) // 2 before
    it; a window past a contig end is slid back inside. Returns the windows and the 1-based
    inclusive bounds of the REF window."""
    assert contig[pos - 1 : pos - 1 + len(ref)] == ref
    hap = contig[: pos - 1] + alt + contig[pos - 1 + len(ref) :]

    def cut(seq: str, allele: str) -> tuple[str, int]:
        n = min(w, len(seq))
        start = min(max(pos - 1 - (n - len(allele)) // 2, 0), len(seq) - n)
        return seq[start : start + n], start

    (ref_win, lo), (alt_win, _) = cut(contig, ref), cut(hap, alt)
    return ref_win, alt_win, lo + 1, lo + len(ref_win)


@torch.no_grad()
def one_pass_ll(model, seq: str) -> float:
    ids = torch.tensor([[BOS_ID] + [b + NUM_SPECIAL for b in seq.encode()]])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(logp[torch.arange(len(seq)), ids[0, 1:]].sum())


def run(args: list) -> int:
    return main(["score-variants", *[str(a) for a in args]])


def read_tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))


def header_lines(path: Path) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.startswith("#")]


def vcf_records(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text().splitlines(keepends=True)
    return [x for x in lines if x.startswith("#")], [x for x in lines if not x.startswith("#")]


# ---------------------------------------------------------------------------- 1. real variants


@pytest.mark.parametrize("windows", ["equal", "shared-flanks"])
def test_real_variants_match_independent_window_scores(model_dir, ecoli, tmp_path, capsys, windows):
    header, recs = vcf_records(REAL_VCF)
    assert 100 <= len(recs) <= 400 and REAL_VCF.stat().st_size < 100_000
    subset = recs[:20]
    kinds = [len(r.split("\t")[3]) - len(r.split("\t")[4]) for r in subset]
    assert any(k == 0 for k in kinds) and any(k > 0 for k in kinds) and any(k < 0 for k in kinds)
    vcf = tmp_path / "sub.vcf"
    vcf.write_text("".join(header + subset))
    out = tmp_path / "scores.tsv"
    assert run(["--model", model_dir, "--reference", ecoli, "--variants", vcf, "--window", 64,
                "--batch-size", 3, "--out", out, "--no-progress", "--windows", windows]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hyena-glt score-variants: 20 records, 20 ALT alleles: scored 20, rejected 0")

    reference = read_fasta_gz(ecoli)
    model = load_causal_lm(model_dir).eval()
    rows = read_tsv(out)
    assert [r["id"] for r in rows] == [x.split("\t")[2] for x in subset]
    for row, line in zip(rows, subset):
        chrom, pos, vid, ref, alt = line.split("\t")[:5]
        assert (row["chrom"], row["pos"], row["ref"], row["alt"], row["status"]) == (chrom, pos, ref, alt, "ok")
        if windows == "equal":
            ref_win, alt_win, lo, hi = expected_equal_windows(reference[chrom], int(pos), ref, alt, 64)
            assert len(ref_win) == len(alt_win) == 64
        else:
            ref_win, alt_win, lo, hi = expected_windows(reference[chrom], int(pos), ref, alt, 64)
            assert len(ref_win) == 64 and len(alt_win) == 64 - len(ref) + len(alt)
        assert (int(row["win_start"]), int(row["win_end"])) == (lo, hi)
        ll_ref, ll_alt = one_pass_ll(model, ref_win), one_pass_ll(model, alt_win)
        assert float(row["ll_ref"]) == pytest.approx(ll_ref, abs=1e-4), vid
        assert float(row["ll_alt"]) == pytest.approx(ll_alt, abs=1e-4), vid
        assert float(row["delta"]) == pytest.approx(ll_alt - ll_ref, abs=1e-4), vid
    assert any(abs(float(r["delta"])) > 1e-3 for r in rows)
    assert header_lines(out)[0] == (f"# hyena-glt score-variants: score=sum windows={windows} window=64 "
                                    "strands=forward max_indel=50 max_n_fraction=0.1")


def test_window_log_likelihoods_is_independent_of_batching_and_order(model_dir):
    from launch.inference.variants import window_log_likelihoods

    model = load_causal_lm(model_dir)
    rng = random.Random(1)
    seqs = [bytes(rng.choice(b"ACGT") for _ in range(n)) for n in (30, 31, 30, 45, 30, 1, 31)]
    one = window_log_likelihoods(model, seqs, batch_size=1)
    many = window_log_likelihoods(model, seqs, batch_size=4)
    rev = window_log_likelihoods(model, seqs[::-1], batch_size=8)[::-1]
    expect = [one_pass_ll(model, s.decode()) for s in seqs]
    for a, b, c, e in zip(one, many, rev, expect):
        assert a == pytest.approx(e, abs=1e-4) and b == pytest.approx(e, abs=1e-4) and c == pytest.approx(e, abs=1e-4)


# ---------------------------------------------------------------------------- 2. malformed lines


@pytest.mark.parametrize(
    "bad_line, what",
    [
        ("chrA\tx12\t.\tA\tG\t.\t.\t.\n", "POS 'x12' is not a non-negative integer"),
        ("chrA\t12\t.\tA\n", "4 tab-separated columns"),
        ("chrA\t12\t.\tA\tG\thigh\t.\t.\n", "QUAL 'high'"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_malformed_line_exits_2_naming_file_and_line_and_writes_nothing(model_dir, small_ref, tmp_path, capsys,
                                                                        bad_line, what, compressed):
    fasta, contigs = small_ref
    text = HEADER.format(contigs="") + f"chrA\t5\t.\t{contigs['chrA'][4]}\tT\t.\t.\t.\n" + bad_line
    vcf = tmp_path / ("bad.vcf.gz" if compressed else "bad.vcf")
    if compressed:
        vcf.write_bytes(gzip.compress(text.encode()))
    else:
        vcf.write_text(text)
    out = tmp_path / "out" / "scores.tsv"
    out.parent.mkdir()
    rc = run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 64, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"{vcf}: line 4:" in err and what in err
    assert list(out.parent.iterdir()) == []


def test_non_vcf_and_missing_header_are_one_line_errors(model_dir, small_ref, tmp_path, capsys):
    fasta, _ = small_ref
    vcf = tmp_path / "x.vcf"
    vcf.write_text("chrA\t5\t.\tA\tT\t.\t.\t.\n")
    out = tmp_path / "s.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--out", out, "--window", 64]) == 2
    err = capsys.readouterr().err
    assert "line 1: not a VCF file" in err and len(err.strip().splitlines()) == 1 and not out.exists()


# ---------------------------------------------------------------------------- 3. bad records


@pytest.fixture
def small_ref(lambda_phage, tmp_path) -> tuple[Path, dict[str, str]]:
    """Two contigs cut from the real lambda phage genome."""
    seq = next(iter(read_fasta_gz(lambda_phage).values()))
    contigs = {"chrA": seq[:2000], "chrB": seq[2000:2600]}
    path = tmp_path / "ref.fa"
    path.write_text("".join(f">{k} cut from lambda\n{v}\n" for k, v in contigs.items()))
    return path, contigs


@pytest.mark.parametrize("windows", ["equal", "shared-flanks"])
def test_bad_records_are_counted_and_reported_and_the_rest_scored(model_dir, small_ref, tmp_path, capsys, windows):
    fasta, c = small_ref
    a, b = c["chrA"], c["chrB"]
    wrong = "ACGT".replace(a[99], "")[0]
    long_del = a[299:351]  # 52 bases: a 51-base deletion, over --max-indel 50
    lines = [
        f"chrA\t50\tgood_snv\t{a[49]}\t{'C' if a[49] != 'C' else 'G'}\t.\tPASS\t.",
        f"chrA\t100\tmismatch\t{wrong}\tT\t.\t.\t.",
        "chrZ\t10\tunknown\tA\tG\t.\t.\t.",
        f"chrA\t200\tsym\t{a[199]}\t<DEL>\t.\t.\t.",
        f"chrA\t210\tbnd\t{a[209]}\t{a[209]}]chrB:5]\t.\t.\t.",
        f"chrA\t300\ttoolong\t{long_del}\t{a[299]}\t.\t.\t.",
        f"chrA\t400\tok_del\t{a[399:409]}\t{a[399]}\t.\t.\t.",
        f"chrA\t500\tmulti\t{a[499]}\t{a[499]}TTT,*,<INS>,G\t.\t.\t.",
        f"chrA\t600\tnoalt\t{a[599]}\t.\t.\t.\t.",
        f"chrB\t3\tnear_start\t{b[2]}\tA\t.\t.\t.",
        f"chrB\t598\tnear_end\t{b[597:599]}\t{b[597]}\t.\t.\t.",
        f"chrB\t600\toff_end\t{b[599]}AA\tA\t.\t.\t.",
        f"chrA\t700\tiupac\t{a[699]}\tR\t.\t.\t.",
    ]
    vcf = tmp_path / "mixed.vcf"
    vcf.write_text(HEADER.format(contigs="##contig=<ID=chrA,length=2000>\n") + "\n".join(lines) + "\n")
    out = tmp_path / "scores.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 60,
                "--max-indel", 50, "--out", out, "--windows", windows]) == 0
    err = capsys.readouterr().err
    rows = read_tsv(out)
    status = {(r["id"], r["alt"]): r["status"] for r in rows}
    assert status == {
        ("good_snv", lines[0].split("\t")[4]): "ok",
        ("mismatch", "T"): "ref_mismatch",
        ("unknown", "G"): "unknown_contig",
        ("sym", "<DEL>"): "symbolic_alt",
        ("bnd", f"{a[209]}]chrB:5]"): "symbolic_alt",
        ("toolong", a[299]): "indel_too_long",
        ("ok_del", a[399]): "ok",
        ("multi", f"{a[499]}TTT"): "ok",
        ("multi", "*"): "symbolic_alt",
        ("multi", "<INS>"): "symbolic_alt",
        ("multi", "G"): "ok",
        ("noalt", "."): "no_alt",
        ("near_start", "A"): "clipped",
        ("near_end", b[597]): "clipped",
        ("off_end", "A"): "outside_contig",
        ("iupac", "R"): "invalid_allele",
    }
    assert len(rows) == 16  # one row per ALT allele, none dropped
    # Every rejection says why, in the TSV and on stderr; a REF mismatch names both bases.
    by_id = {r["id"]: r for r in rows}
    mm = by_id["mismatch"]["message"]
    assert f"REF {wrong} does not match the reference, which has {a[99]} at chrA:100-100" in mm and "line 5" in mm
    assert "chromosome 'chrZ' is not in the reference (it has chrA, chrB)" in by_id["unknown"]["message"]
    assert "more than --max-indel 50" in by_id["toolong"]["message"]
    # The clip message names the contig end the window meets.
    near_start, near_end = by_id["near_start"]["message"], by_id["near_end"]["message"]
    if windows == "equal":
        assert near_start == "window meets the start of chrB (600 bases): moved inward, allele off-centre, REF window 1-60"
        assert near_end.startswith("window meets the end of chrB (600 bases): moved inward") and "541-600" in near_end
    else:
        assert near_start == "window clipped at the start of chrB (600 bases): 1-33 (33 of 60 bases)"
        assert near_end.startswith("window clipped at the end of chrB (600 bases): 569-600")
    for r in rows:
        if r["status"] in ("ok", "clipped"):
            assert r["ll_ref"] != "NA" and math.isfinite(float(r["delta"]))
        else:
            assert (r["ll_ref"], r["ll_alt"], r["delta"]) == ("NA", "NA", "NA") and r["message"]
            assert f"rejected ({r['status']}): {r['message']}" in err
    summary = err.strip().splitlines()[-1]
    assert summary == (
        f"hyena-glt score-variants: 13 records, 16 ALT alleles: scored 6 (2 with windows at a contig end), "
        f"rejected 10 (unknown_contig 1, outside_contig 1, ref_mismatch 1, symbolic_alt 4, no_alt 1, "
        f"invalid_allele 1, indel_too_long 1); wrote {out}"
    )
    # Scored rows agree with the independent computation, clipped windows included.
    model = load_causal_lm(model_dir).eval()
    for r in rows:
        if r["status"] not in ("ok", "clipped"):
            continue
        if windows == "equal":
            ref_win, alt_win, lo, hi = expected_equal_windows(c[r["chrom"]], int(r["pos"]), r["ref"], r["alt"], 60)
            assert len(ref_win) == len(alt_win) == 60
        else:
            ref_win, alt_win, lo, hi = expected_windows(c[r["chrom"]], int(r["pos"]), r["ref"], r["alt"], 60)
            assert (len(ref_win) < 60) == (r["status"] == "clipped")
        assert (int(r["win_start"]), int(r["win_end"])) == (lo, hi)
        assert float(r["delta"]) == pytest.approx(one_pass_ll(model, alt_win) - one_pass_ll(model, ref_win), abs=1e-4)


def test_ref_longer_than_the_window_is_rejected(model_dir, small_ref, tmp_path, capsys):
    fasta, c = small_ref
    a = c["chrA"]
    vcf = tmp_path / "v.vcf"
    vcf.write_text(HEADER.format(contigs="") + f"chrA\t100\tdel20\t{a[99:120]}\t{a[99]}\t.\t.\t.\n"
                   f"chrA\t200\tins20\t{a[199]}\t{a[199]}{'A' * 20}\t.\t.\t.\n")
    out = tmp_path / "s.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 16, "--out", out,
                "--windows", "shared-flanks"]) == 0
    rows = {r["id"]: r for r in read_tsv(out)}
    assert rows["del20"]["status"] == "ref_longer_than_window"
    assert "REF of 21 bases does not fit in --window 16" in rows["del20"]["message"]
    # An insertion only lengthens the ALT window: 16 - 1 + 21 bases, same flanks.
    assert rows["ins20"]["status"] == "ok"
    ref_win, alt_win, lo, hi = expected_windows(a, 200, a[199], a[199] + "A" * 20, 16)
    assert len(alt_win) == 36 and (int(rows["ins20"]["win_start"]), int(rows["ins20"]["win_end"])) == (lo, hi)
    model = load_causal_lm(model_dir).eval()
    assert float(rows["ins20"]["delta"]) == pytest.approx(one_pass_ll(model, alt_win) - one_pass_ll(model, ref_win),
                                                          abs=1e-4)
    assert "rejected 1 (ref_longer_than_window 1)" in capsys.readouterr().err
    # Equal windows: the 21-base ALT must fit in W too.
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 16, "--out", out]) == 0
    rows = {r["id"]: r for r in read_tsv(out)}
    assert (rows["del20"]["status"], rows["ins20"]["status"]) == ("ref_longer_than_window", "alt_longer_than_window")
    assert "ALT of 21 bases does not fit in --window 16" in rows["ins20"]["message"]
    capsys.readouterr()


# ---------------------------------------------------------------------------- 4. compressed VCF


def test_bgzip_and_gzip_vcf_give_the_same_scores_as_plain(model_dir, ecoli, tmp_path, capsys):
    import pysam

    header, recs = vcf_records(REAL_VCF)
    plain = tmp_path / "v.vcf"
    plain.write_text("".join(header + recs[20:32]))
    bgz = tmp_path / "v.vcf.gz"
    pysam.tabix_compress(str(plain), str(bgz))
    with open(bgz, "rb") as f:
        head = f.read(16)
    assert head[:2] == b"\x1f\x8b" and head[12:14] == b"BC"  # BGZF blocks
    gz = tmp_path / "v2.vcf.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    outs = []
    for i, src in enumerate((plain, bgz, gz)):
        out = tmp_path / f"s{i}.tsv"
        assert run(["--model", model_dir, "--reference", ecoli, "--variants", src, "--window", 48,
                    "--out", out, "--no-progress"]) == 0
        outs.append([line for line in out.read_text().splitlines() if not line.startswith("#")])
        assert f"variants={src}" in header_lines(out)[-1]
    assert outs[0] == outs[1] == outs[2]
    rows = read_tsv(tmp_path / "s1.tsv")
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    assert "scored 12, rejected 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------- other family


def test_token_merging_model_scores_match_independent_forward(small_ref, tmp_path, capsys):
    fasta, c = small_ref
    a = c["chrA"]
    lm = tmp_path / "blt"
    build_causal_lm(HyenaGLTConfig(**SMALL, **MERGING)).save_pretrained(lm)
    vcf = tmp_path / "v.vcf"
    snv = "T" if a[99] != "T" else "A"
    vcf.write_text(HEADER.format(contigs="") + f"chrA\t100\t.\t{a[99]}\t{a[99]}GA,{snv}\t.\t.\t.\n"
                   f"chrA\t150\t.\t{a[149:153]}\t{a[149]}\t.\t.\t.\n")
    out = tmp_path / "s.tsv"
    assert run(["--model", lm, "--reference", fasta, "--variants", vcf, "--window", 32, "--max-indel", 10,
                "--out", out]) == 0
    model = load_causal_lm(lm).eval()
    rows = read_tsv(out)
    assert len(rows) == 3
    for r in rows:
        ref_win, alt_win, _, _ = expected_equal_windows(a, int(r["pos"]), r["ref"], r["alt"], 32)
        assert float(r["ll_ref"]) == pytest.approx(one_pass_ll(model, ref_win), abs=1e-4)
        assert float(r["ll_alt"]) == pytest.approx(one_pass_ll(model, alt_win), abs=1e-4)


# ---------------------------------------------------------------------------- every record of a real VCF


@pytest.fixture(scope="module")
def two_genomes(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A reference of two real E. coli sequences: K-12 W3110 (the real VCF's NC_007779.1) and
    the metagenomic contig whose middle is one real run of 432,770 N."""
    from conftest import genome_path

    seqs = {}
    for name in ("ecoli_k12_w3110.fasta.gz", "ecoli_contig_nmasked.fasta.gz"):
        seqs.update(read_fasta_gz(genome_path(name)))
    path = tmp_path_factory.mktemp("two_genomes") / "ref.fa"
    path.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    return path, seqs


def derived_records(seqs: dict[str, str]) -> list[tuple[str, str]]:
    """Records added to the real ones, each (expected status per ALT, VCF line), bases taken
    from the real sequences: a multi-allelic record (the real ecw18 insertion and ecw19
    deletion, 11 bases apart, merged as a joint caller writes two overlapping haplotypes, with
    the spanning-deletion allele '*'), variants at both ends of NC_007779.1, and variants in
    and beside the real N run of the contig."""
    w = seqs["NC_007779.1"]
    cname = next(k for k in seqs if k != "NC_007779.1")
    c = seqs[cname]
    n_start, n_end = c.index("N"), c.rindex("N") + 1  # 0-based half-open: the run of N
    assert (n_start, n_end) == (383781, 816551) and set(c[n_start:n_end]) == {"N"}
    other = lambda b: "C" if b != "C" else "T"
    ref18, alt18, ref19, alt19 = "C", "CCAAACA", "ATACATT", "A"  # ecw18 at 729766, ecw19 at 729777
    assert w[729765] == ref18 and w[729776:729783] == ref19
    merged = w[729765:729783]
    alt1 = alt18 + merged[1:]  # ecw18's haplotype over the merged span
    alt2 = merged[:11] + alt19  # ecw19's
    n = len(w)
    return [
        ("ok,ok,symbolic_alt", f"NC_007779.1\t729766\tmulti_ecw18_ecw19\t{merged}\t{alt1},{alt2},*\t.\tPASS\t."),
        ("clipped", f"NC_007779.1\t1\tstart_snv\t{w[0]}\t{other(w[0])}\t.\t.\t."),
        ("clipped", f"NC_007779.1\t3\tstart_ins\t{w[2]}\t{w[2]}GATTACA\t.\t.\t."),
        ("clipped", f"NC_007779.1\t{n - 3}\tend_del\t{w[n - 4:]}\t{w[n - 4]}\t.\t.\t."),
        ("clipped", f"NC_007779.1\t{n}\tend_ins\t{w[n - 1]}\t{w[n - 1]}TT\t.\t.\t."),
        ("outside_contig", f"NC_007779.1\t{n - 1}\tpast_end\t{w[n - 2:]}A\t{w[n - 2]}\t.\t.\t."),
        ("n_window", f"{cname}\t500000\tin_n_run\tN\tA\t.\t.\t."),
        ("n_window", f"{cname}\t{n_end + 1}\tafter_n_run\t{c[n_end]}\t{other(c[n_end])}\t.\t.\t."),
        ("n_window", f"{cname}\t{n_start - 100}\tnear_n_run\t{c[n_start - 101]}\t{other(c[n_start - 101])}\t.\t.\t."),
        ("ok", f"{cname}\t{n_start - 120}\tbeside_n_run\t{c[n_start - 121]}\t{other(c[n_start - 121])}\t.\t.\t."),
        ("ok", f"{cname}\t{n_end + 3000}\tpast_n_run\t{c[n_end + 2999]}\t{other(c[n_end + 2999])}\t.\t.\t."),
    ]


def test_every_record_of_a_real_vcf_is_accounted_for(model_dir, two_genomes, tmp_path, capsys):
    """All 261 real records (SNVs, insertions up to 39 bases, deletions up to 47) and the
    derived ones: one row per ALT, in VCF order; each scored, or not scored with a reason."""
    fasta, seqs = two_genomes
    header, real = vcf_records(REAL_VCF)
    derived = derived_records(seqs)
    vcf = tmp_path / "all.vcf"
    vcf.write_text("".join(header) + "".join(real) + "".join(line + "\n" for _, line in derived))
    out = tmp_path / "scores.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--out", out, "--no-progress",
                "--batch-size", 32]) == 0
    err = capsys.readouterr().err
    rows = read_tsv(out)
    records = [line.rstrip("\n").split("\t") for line in real] + [line.split("\t") for _, line in derived]
    alleles = [(f[0], f[1], f[2], f[3], a) for f in records for a in f[4].split(",")]
    assert [(r["chrom"], r["pos"], r["id"], r["ref"], r["alt"]) for r in rows] == alleles  # none dropped, in order

    max_seq_len = SMALL["max_seq_len"]  # the default window: every window fits the model
    assert header_lines(out)[0] == ("# hyena-glt score-variants: score=sum windows=equal window=256 strands=forward "
                                    "max_indel=50 max_n_fraction=0.1")
    for r in rows:
        if r["status"] in ("ok", "clipped"):
            assert math.isfinite(float(r["delta"])) and int(r["win_end"]) - int(r["win_start"]) + 1 == max_seq_len
        else:
            assert r["status"] in ("outside_contig", "symbolic_alt", "n_window"), r
            assert (r["ll_ref"], r["ll_alt"], r["delta"]) == ("NA", "NA", "NA") and r["message"].startswith("line ")
    # Every real record is scored (its windows are far from the contig ends); the derived
    # ones get the status each was made for.
    assert all(r["status"] == "ok" for r in rows[: len(real)])
    got = [r["status"] for r in rows[len(real) :]]
    assert got == [s for want, _ in derived for s in want.split(",")]
    by_id = {r["id"]: r for r in rows if r["alt"] != "*"}
    assert "window meets the start of NC_007779.1" in by_id["start_snv"]["message"]
    assert "window meets the end of NC_007779.1" in by_id["end_del"]["message"]
    assert "256 of the 256 bases of the REF window" in by_id["in_n_run"]["message"]
    assert "(50%, more than --max-n-fraction 0.1)" in by_id["after_n_run"]["message"]
    assert "N in the" in by_id["beside_n_run"]["message"] and by_id["past_n_run"]["message"] == ""
    # The multi-allelic record: each ALT scored on its own haplotype, as computed here.
    model = load_causal_lm(model_dir).eval()
    contig = seqs["NC_007779.1"]
    for r in (x for x in rows if x["id"] == "multi_ecw18_ecw19" and x["status"] == "ok"):
        ref_win, alt_win, lo, hi = expected_equal_windows(contig, int(r["pos"]), r["ref"], r["alt"], 256)
        assert (int(r["win_start"]), int(r["win_end"])) == (lo, hi)
        assert float(r["delta"]) == pytest.approx(one_pass_ll(model, alt_win) - one_pass_ll(model, ref_win), abs=1e-4)
    n_rows = len(alleles)
    assert err.strip().splitlines()[-1] == (
        f"hyena-glt score-variants: {len(records)} records, {n_rows} ALT alleles: scored {n_rows - 5} (4 with windows "
        f"at a contig end), rejected 5 (outside_contig 1, symbolic_alt 1, n_window 3); wrote {out}")


# ---------------------------------------------------------------------------- the indel length effect


def indel_length_correlation(path: Path) -> float:
    rows = [r for r in read_tsv(path) if r["status"] == "ok" and len(r["ref"]) != len(r["alt"])]
    x = torch.tensor([len(r["alt"]) - len(r["ref"]) for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["delta"]) for r in rows], dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def test_equal_windows_and_per_base_remove_the_indel_length_effect(model_dir, ecoli, tmp_path, capsys):
    """With shared flanks the ALT window of a deletion is shorter, and delta follows the
    length change (every base costs the model nats); equal windows and --per-base do not."""
    header, recs = vcf_records(REAL_VCF)
    indels = [x for x in recs if len(x.split("\t")[3]) != len(x.split("\t")[4])]
    vcf = tmp_path / "indels.vcf"
    vcf.write_text("".join(header + indels))
    corr = {}
    for name, opts in (("shared", ["--windows", "shared-flanks"]), ("per-base", ["--windows", "shared-flanks",
                       "--per-base"]), ("equal", [])):
        out = tmp_path / f"{name}.tsv"
        assert run(["--model", model_dir, "--reference", ecoli, "--variants", vcf, "--window", 128, "--out", out,
                    "--no-progress", "--batch-size", 32, *opts]) == 0
        corr[name] = indel_length_correlation(out)
    capsys.readouterr()
    assert corr["shared"] < -0.95, corr
    assert abs(corr["equal"]) < 0.5 and abs(corr["per-base"]) < 0.5, corr


# ---------------------------------------------------------------------------- options


def test_both_strands_and_per_base(model_dir, small_ref, tmp_path, capsys):
    fasta, c = small_ref
    a = c["chrA"]
    vcf = tmp_path / "v.vcf"
    vcf.write_text(HEADER.format(contigs="") + f"chrA\t100\tsnv\t{a[99]}\t{'T' if a[99] != 'T' else 'A'}\t.\t.\t.\n"
                   f"chrA\t300\tdel\t{a[299:304]}\t{a[299]}\t.\t.\t.\n")
    model = load_causal_lm(model_dir).eval()
    comp = str.maketrans("ACGT", "TGCA")
    rc = lambda s: s.translate(comp)[::-1]
    for opts, expect in (
        (["--strands", "both"], lambda s: (one_pass_ll(model, s) + one_pass_ll(model, rc(s))) / 2),
        (["--per-base"], lambda s: one_pass_ll(model, s) / len(s)),
        (["--per-base", "--strands", "both", "--windows", "shared-flanks"],
         lambda s: (one_pass_ll(model, s) + one_pass_ll(model, rc(s))) / 2 / len(s)),
    ):
        out = tmp_path / "s.tsv"
        assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 40, "--out", out,
                    *opts]) == 0
        first = header_lines(out)[0]
        assert ("strands=both" in first) == ("both" in opts) and ("score=per-base" in first) == ("--per-base" in opts)
        for r in read_tsv(out):
            make = expected_windows if "shared-flanks" in opts else expected_equal_windows
            ref_win, alt_win, _, _ = make(a, int(r["pos"]), r["ref"], r["alt"], 40)
            assert float(r["ll_ref"]) == pytest.approx(expect(ref_win), abs=1e-5 if "--per-base" in opts else 1e-4)
            assert float(r["ll_alt"]) == pytest.approx(expect(alt_win), abs=1e-5 if "--per-base" in opts else 1e-4)
    capsys.readouterr()


def test_default_window_fits_the_model_and_longer_ones_are_refused(model_dir, small_ref, tmp_path, capsys):
    fasta, c = small_ref
    a = c["chrA"]
    ins = a[999] + "ACGTTGCAAC" * 5  # a 50-base insertion: the longest --max-indel 50 allows
    vcf = tmp_path / "v.vcf"
    vcf.write_text(HEADER.format(contigs="") + f"chrA\t1000\tins50\t{a[999]}\t{ins}\t.\t.\t.\n")
    out = tmp_path / "s.tsv"
    # Defaults: equal windows of max_seq_len (256) bases; shared flanks: 256 - 50 = 206, so the
    # ALT window of the longest insertion allowed is 256 bases.
    for opts, window, alt_len in (([], 256, 256), (["--windows", "shared-flanks"], 206, 256)):
        assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--out", out, *opts]) == 0
        (row,) = read_tsv(out)
        assert row["status"] == "ok" and f"window={window} " in header_lines(out)[0]
        _, alt_win, _, _ = (expected_windows if opts else expected_equal_windows)(a, 1000, a[999], ins, window)
        assert len(alt_win) == alt_len
    # Shared flanks with W = max_seq_len: the insertion's ALT window would be 306 bases: a reason, not a score.
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--out", out, "--window", 256,
                "--windows", "shared-flanks"]) == 0
    (row,) = read_tsv(out)
    assert row["status"] == "window_too_long" and "ALT window of 306 bases is longer than the model's max_seq_len 256" \
        in row["message"]
    capsys.readouterr()
    # A window over max_seq_len: refused in one line, nothing written.
    out2 = tmp_path / "s2.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--out", out2, "--window", 300]) == 2
    err = capsys.readouterr().err
    assert "--window 300 is longer than the model's max_seq_len 256" in err and not out2.exists()


def test_default_window_rule():
    from launch.inference.variants import default_window

    assert default_window(1024, "equal", 50) == 1024 and default_window(1024, "shared-flanks", 50) == 974
    assert default_window(8192, "equal", 50) == default_window(8192, "shared-flanks", 50) == 1024
    assert default_window(256, "equal", 50) == 256 and default_window(256, "shared-flanks", 50) == 206
