"""`hyena-glt score-variants`: ALT-minus-REF window log-likelihoods per VCF allele.

The expected numbers are computed here, independently of launch/inference/variants.py: the windows are
cut from the reference as docs/inference.md defines them, and each window is scored alone
with one forward pass of the model over [BOS] + window.
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
    """The documented windows: REF in the middle of W bases, left flank (W - len(REF)) // 2,
    ALT window = same flanks around ALT; clipped at the contig ends. Returns 1-based
    inclusive bounds of the REF window."""
    lo = pos - 1 - (w - len(ref)) // 2
    hi = lo + w
    lo, hi = max(lo, 0), min(hi, len(contig))
    assert contig[pos - 1 : pos - 1 + len(ref)] == ref
    return contig[lo:hi], contig[lo : pos - 1] + alt + contig[pos - 1 + len(ref) : hi], lo + 1, hi


@torch.no_grad()
def one_pass_ll(model, seq: str) -> float:
    ids = torch.tensor([[BOS_ID] + [b + NUM_SPECIAL for b in seq.encode()]])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(logp[torch.arange(len(seq)), ids[0, 1:]].sum())


def run(args: list) -> int:
    return main(["score-variants", *[str(a) for a in args]])


def read_tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def vcf_records(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text().splitlines(keepends=True)
    return [x for x in lines if x.startswith("#")], [x for x in lines if not x.startswith("#")]


# ---------------------------------------------------------------------------- 1. real variants


def test_real_variants_match_independent_window_scores(model_dir, ecoli, tmp_path, capsys):
    header, recs = vcf_records(REAL_VCF)
    assert 100 <= len(recs) <= 400 and REAL_VCF.stat().st_size < 100_000
    subset = recs[:20]
    kinds = [len(r.split("\t")[3]) - len(r.split("\t")[4]) for r in subset]
    assert any(k == 0 for k in kinds) and any(k > 0 for k in kinds) and any(k < 0 for k in kinds)
    vcf = tmp_path / "sub.vcf"
    vcf.write_text("".join(header + subset))
    out = tmp_path / "scores.tsv"
    assert run(["--model", model_dir, "--reference", ecoli, "--variants", vcf, "--window", 64,
                "--batch-size", 3, "--out", out, "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hyena-glt score-variants: 20 records, 20 ALT alleles: scored 20, rejected 0")

    reference = read_fasta_gz(ecoli)
    model = load_causal_lm(model_dir).eval()
    rows = read_tsv(out)
    assert [r["id"] for r in rows] == [x.split("\t")[2] for x in subset]
    for row, line in zip(rows, subset):
        chrom, pos, vid, ref, alt = line.split("\t")[:5]
        assert (row["chrom"], row["pos"], row["ref"], row["alt"], row["status"]) == (chrom, pos, ref, alt, "ok")
        ref_win, alt_win, lo, hi = expected_windows(reference[chrom], int(pos), ref, alt, 64)
        assert len(ref_win) == 64 and len(alt_win) == 64 - len(ref) + len(alt)
        assert (int(row["win_start"]), int(row["win_end"])) == (lo, hi)
        ll_ref, ll_alt = one_pass_ll(model, ref_win), one_pass_ll(model, alt_win)
        assert float(row["ll_ref"]) == pytest.approx(ll_ref, abs=1e-4), vid
        assert float(row["ll_alt"]) == pytest.approx(ll_alt, abs=1e-4), vid
        assert float(row["delta"]) == pytest.approx(ll_alt - ll_ref, abs=1e-4), vid
    assert any(abs(float(r["delta"])) > 1e-3 for r in rows)


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


def test_bad_records_are_counted_and_reported_and_the_rest_scored(model_dir, small_ref, tmp_path, capsys):
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
                "--max-indel", 50, "--out", out]) == 0
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
    for r in rows:
        if r["status"] in ("ok", "clipped"):
            assert r["ll_ref"] != "NA" and math.isfinite(float(r["delta"]))
        else:
            assert (r["ll_ref"], r["ll_alt"], r["delta"]) == ("NA", "NA", "NA") and r["message"]
            assert f"rejected ({r['status']}): {r['message']}" in err
    summary = err.strip().splitlines()[-1]
    assert summary == (
        f"hyena-glt score-variants: 13 records, 16 ALT alleles: scored 6 (2 with windows clipped at a contig end), "
        f"rejected 10 (unknown_contig 1, outside_contig 1, ref_mismatch 1, symbolic_alt 4, no_alt 1, "
        f"invalid_allele 1, indel_too_long 1); wrote {out}"
    )
    # Scored rows agree with the independent computation, clipped windows included.
    model = load_causal_lm(model_dir).eval()
    for r in rows:
        if r["status"] not in ("ok", "clipped"):
            continue
        ref_win, alt_win, lo, hi = expected_windows(c[r["chrom"]], int(r["pos"]), r["ref"], r["alt"], 60)
        assert (int(r["win_start"]), int(r["win_end"])) == (lo, hi)
        assert (len(ref_win) < 60) == (r["status"] == "clipped")
        assert float(r["delta"]) == pytest.approx(one_pass_ll(model, alt_win) - one_pass_ll(model, ref_win), abs=1e-4)


def test_ref_longer_than_the_window_is_rejected(model_dir, small_ref, tmp_path, capsys):
    fasta, c = small_ref
    a = c["chrA"]
    vcf = tmp_path / "v.vcf"
    vcf.write_text(HEADER.format(contigs="") + f"chrA\t100\tdel20\t{a[99:120]}\t{a[99]}\t.\t.\t.\n"
                   f"chrA\t200\tins20\t{a[199]}\t{a[199]}{'A' * 20}\t.\t.\t.\n")
    out = tmp_path / "s.tsv"
    assert run(["--model", model_dir, "--reference", fasta, "--variants", vcf, "--window", 16, "--out", out]) == 0
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
        outs.append(out.read_text())
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
        ref_win, alt_win, _, _ = expected_windows(a, int(r["pos"]), r["ref"], r["alt"], 32)
        assert float(r["ll_ref"]) == pytest.approx(one_pass_ll(model, ref_win), abs=1e-4)
        assert float(r["ll_alt"]) == pytest.approx(one_pass_ll(model, alt_win), abs=1e-4)
