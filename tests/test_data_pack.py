"""`hyena-glt pack` round trip on real genomes: every window's bases against the source,
coverage of every record, and counts in = counts out + reported drops."""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
from test_data_support import manifest, pack_samples, read_fasta, revcomp, run_cli, write_fasta

SEQ_LEN, STRIDE, MIN_LEN, MAX_N = 3000, 2500, 700, 0.1


def expected_windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    out, s = [], 0
    while True:
        e = min(s + seq_len, length)
        out.append((s, e))
        if e >= length:
            return out
        s += stride


def fate(seq: bytes, s: int, e: int) -> str:
    if e - s < MIN_LEN:
        return "short"
    if (seq.count(b"N", s, e) + seq.count(b"n", s, e)) > MAX_N * (e - s):
        return "n_fraction"
    return "kept"


@pytest.fixture
def packed(tmp_path, lambda_phage, nmasked_contig, ecoli):
    # A real E. coli slice with soft-masked (lower-case) stretches, as repeat-masked assemblies have.
    name, seq = read_fasta(ecoli)[0]
    part = bytearray(seq[:200_600])  # the last window (600 bases) is shorter than --min-len
    for a in range(10_000, 200_000, 40_000):
        part[a : a + 5_000] = part[a : a + 5_000].lower()
    soft = write_fasta(tmp_path / "ecoli_soft.fa", [(name, bytes(part))], width=60)
    inputs = [lambda_phage, nmasked_contig, soft]
    out = tmp_path / "out"
    rc, _, err = run_cli(
        "pack", *inputs, "--out", out, "--seq-len", SEQ_LEN, "--stride", STRIDE, "--min-len", MIN_LEN,
        "--max-n-fraction", MAX_N, "--reverse-complement", "both", "--shard-size-mb", "0.3",
        "--val-fraction", "0.4", "--test-fraction", "0.3", "--progress", "none",
    )
    assert rc == 0, err
    return inputs, out


def test_round_trip_windows_coverage_and_accounting(packed):
    inputs, out = packed
    samples = pack_samples(out)
    m = manifest(out)
    planned = kept = 0
    dropped = {"short": [0, 0], "n_fraction": [0, 0]}
    seen_keys = set()
    for path in inputs:
        for rec_id, seq in read_fasta(path):
            windows = expected_windows(len(seq), SEQ_LEN, STRIDE)
            # Windows cover the record: consecutive, first at 0, last at the end.
            assert windows[0][0] == 0 and windows[-1][1] == len(seq)
            assert all(b[0] - a[0] == STRIDE for a, b in zip(windows, windows[1:]))
            by_start = {}
            for key, smp in samples.items():
                if smp["meta"]["record_id"] == rec_id and smp["meta"]["source"] == str(path):
                    by_start.setdefault(smp["meta"]["start"], {})[smp["meta"]["strand"]] = (key, smp)
            splits = set()
            for s, e in windows:
                planned += 1
                f = fate(seq, s, e)
                if f != "kept":
                    dropped[f][0] += 1
                    dropped[f][1] += e - s
                    assert s not in by_start, f"{rec_id}:{s} should have been dropped ({f})"
                    continue
                kept += 1
                strands = by_start.pop(s)
                assert set(strands) == {"+", "-"}
                (kf, fwd), (kr, rev) = strands["+"], strands["-"]
                seen_keys |= {kf, kr}
                assert fwd["meta"]["end"] == e and rev["meta"]["end"] == e
                assert fwd["seq"] == seq[s:e]  # bases exactly as in the source, case kept
                assert rev["seq"] == revcomp(seq[s:e])
                assert fwd["meta"]["seq_type"] == "DNA"
                assert fwd["shard"].startswith(fwd["meta"]["split"] + "-")
                splits.add(fwd["meta"]["split"])
            assert not by_start, f"unexpected windows {sorted(by_start)} in {rec_id}"
            assert len(splits) <= 1  # the split is per record
    assert seen_keys == set(samples)  # nothing in the shards that is not a source window
    w = m["windows"]
    assert (w["planned"]["windows"], w["kept"]["windows"]) == (planned, kept)
    assert w["planned"]["windows"] == w["kept"]["windows"] + w["dropped"]["windows"]
    assert w["planned"]["bases"] == w["kept"]["bases"] + w["dropped"]["bases"]
    for reason, (n, b) in dropped.items():
        assert (m["dropped"][reason]["windows"], m["dropped"][reason]["bases"]) == (n, b)
    assert dropped["n_fraction"][0] > 100  # the N-masked contig really exercises the filter
    assert dropped["short"][0] >= 1
    assert sum(t["samples"] for t in m["totals"].values()) == len(samples) == 2 * kept
    assert m["input_totals"] == {"files": 3, "records": 3, "bases": sum(len(s) for p in inputs for _, s in read_fasta(p))}


def test_soft_masking_kept_in_shards(packed):
    _, out = packed
    lower = [s for s in pack_samples(out).values() if s["meta"]["strand"] == "+" and any(97 <= c <= 122 for c in s["seq"])]
    assert lower, "soft-masked bases must stay lower case"
    assert all(s["meta"]["record_id"] == "NC_007779.1" for s in lower)


def test_manifest_shards_index_and_inputs(packed):
    inputs, out = packed
    m = manifest(out)
    assert [e["path"] for e in m["inputs"]] == [str(p) for p in inputs]
    for e, p in zip(m["inputs"], inputs):
        assert e["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and e["size"] == p.stat().st_size
    samples = pack_samples(out)
    assert {s["path"] for s in m["shards"]} == {p.name for p in out.glob("*.tar")}
    assert len(m["shards"]) > 3
    for s in m["shards"]:
        tar_path = out / s["path"]
        assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == s["sha256"]
        assert s["path"].startswith(s["split"] + "-00000-")
        in_shard = [(k, v) for k, v in samples.items() if v["shard"] == s["path"]]
        assert len(in_shard) == s["samples"]
        assert sum(len(v["seq"]) for _, v in in_shard) == s["bases"]
        # The sidecar index points at each .seq member's bytes in tar order.
        idx = np.load(out / s["index"])
        with tarfile.open(tar_path) as tf:
            seqs = [mm for mm in tf.getmembers() if mm.name.endswith(".seq")]
        assert idx["offset"].tolist() == [mm.offset_data for mm in seqs]
        assert idx["length"].tolist() == [mm.size for mm in seqs]
        assert s["bases"] <= 0.3e6
    splits = {s["split"] for s in m["shards"]}
    assert splits <= {"train", "val", "test"}
    for split, t in m["totals"].items():
        assert t["samples"] == sum(s["samples"] for s in m["shards"] if s["split"] == split)


def test_iupac_rna_protein_and_case(tmp_path, ecoli):
    _, eco = read_fasta(ecoli)[0]
    dna = bytearray(eco[:5000])
    dna[100:110] = b"RYKMSWBDHV"
    dna[2000:2300] = dna[2000:2300].lower()
    rna = eco[5000:8000].replace(b"T", b"U")
    protein = b"MKRISTTITTTITITTGNGAGXX" * 30  # letters beyond the nucleotide codes
    fa = write_fasta(tmp_path / "mixed.fa", [("dna1", bytes(dna)), ("rna1", rna), ("prot1", protein)], width=70)
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", fa, "--out", out, "--seq-len", "1000", "--reverse-complement", "both",
                         "--val-fraction", "0", "--min-len", "1", "--progress", "none")
    assert rc == 0, err
    samples = pack_samples(out).values()
    by = lambda rid, strand: sorted((s for s in samples if s["meta"]["record_id"] == rid and s["meta"]["strand"] == strand),  # noqa: E731
                                    key=lambda s: s["meta"]["start"])
    assert b"".join(s["seq"] for s in by("dna1", "+")) == bytes(dna)
    assert [s["seq"] for s in by("dna1", "-")] == [revcomp(s["seq"]) for s in by("dna1", "+")]
    assert {s["meta"]["seq_type"] for s in by("dna1", "+")} == {"DNA"}
    assert b"".join(s["seq"] for s in by("rna1", "+")) == rna
    assert {s["meta"]["seq_type"] for s in by("rna1", "-")} == {"RNA"}
    assert [s["seq"] for s in by("rna1", "-")] == [revcomp(s["seq"], rna=True) for s in by("rna1", "+")]
    assert b"T" not in b"".join(s["seq"] for s in by("rna1", "-"))
    assert b"".join(s["seq"] for s in by("prot1", "+")) == protein
    assert {s["meta"]["seq_type"] for s in by("prot1", "+")} == {"protein"}
    assert by("prot1", "-") == []  # a protein has no reverse complement
