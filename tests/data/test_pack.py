"""`hyena-glt pack` round trip on real genomes: every window's bases against the source,
coverage of every record, and counts in = counts out + reported drops.

`hyena-glt pack` output pinned to stored sha256s: a change to how shards are written
(speed work on the tar, reverse complement, JSON or planning code) must keep every byte.

The shards' JSON holds each input's absolute path, so the inputs are placed under one fixed
directory; their bytes are copies of the bundled genomes plus one plain FASTA made here
from E. coli (soft-masked stretches, IUPAC codes, an RNA, a protein, an empty and a short
record), never recompressed, so no zlib version can change them.

`hyena-glt pack` never imports torch: the import alone (1-3 s) would be most of a small
pack's time, and every pack worker is forked from that process (a fork of a process that
holds torch costs several times more).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from support.data import (
    forget_completed,
    manifest,
    pack_samples,
    read_fasta,
    revcomp,
    write_fasta,
)

from data_tools import shards
from data_tools.pack import file_pass, shared_hashes
from data_tools.pack import workers as pack_workers
from launch.cli import COMMAND_MODULES

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
        "--allow-empty-split",  # 3 records: the seed puts all of them in test (what is checked here is the windows)
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


# ----------------------------------------------------------------------------
# `hyena-glt pack` output pinned to stored sha256s: a change to how shards are written

# Bump the suffix whenever the inputs made below change.
INPUT_DIR = Path("/tmp/hyena-glt-pack-hash-v2")
OPTIONS = ["--seq-len", "3000", "--stride", "2500", "--min-len", "700", "--max-n-fraction", "0.1",
           "--reverse-complement", "both", "--shard-size-mb", "0.3", "--val-fraction", "0.3",
           "--test-fraction", "0.2", "--seed", "6", "--progress", "none"]

# Recorded with the code before the speed work of issue #13 (shards written by webdataset's
# TarWriter, records read with pyfastx).
EXPECTED = {
    "manifest.json": "9ddc0094ee2992fa282db7ba99a504702126741af43992dd9677378dad5aada5",
    "test-00000-000000.idx": "1539d0f2e87a2b6a321f7878d5f7a5d5639d337b48592b1290a0a180511130fc",
    "test-00000-000000.tar": "3d7f07884bf5064c9078f0565f24e9b782a4b7f116b4b6d236a1fb29c4f01fec",
    "train-00000-000000.idx": "1de15d85c9f64968f9dbf2150723a9134de84ed909463b52e9460210dc03e96c",
    "train-00000-000000.tar": "1031515ec3ac23ba21707ff008285c36f3ec216f51ee42f99ac94fc15344be75",
    "train-00000-000001.idx": "cafb1ecfb38165b7c88b3d10304a660aeae371e9ce4cba5c57c18a1dd792cfd5",
    "train-00000-000001.tar": "7896ebf991c83710dbe25cfec5bb44c5d3334cc769e23a7cda53ed7b1b465534",
    "train-00000-000002.idx": "1167ffc893ddcc087c3955f19bc5478b0f8dba8cc0896a25e1e62114a26e0070",
    "train-00000-000002.tar": "14903354e15cf81576559933dac36f0a2c955521d9af19235e8cfab5f64cdc20",
    "train-00000-000003.idx": "cafb1ecfb38165b7c88b3d10304a660aeae371e9ce4cba5c57c18a1dd792cfd5",
    "train-00000-000003.tar": "32cb4be876830768dc0d5986e578baddb7615c029abe687520c5022761197bbb",
    "train-00000-000004.idx": "cafb1ecfb38165b7c88b3d10304a660aeae371e9ce4cba5c57c18a1dd792cfd5",
    "train-00000-000004.tar": "6413c32cbd84f4c1ed72359c58905d418e54108f54cb27c4bf8b7623595c2708",
    "train-00000-000005.idx": "752dae398e6fc015e2588388149dea0bcb9c0d7e55e87d0525733c1a3fb2996b",
    "train-00000-000005.tar": "b778206e502f2b3a872b49e9ddd5010e00fd5d41837525bc336acc454bc09421",
    "val-00000-000000.idx": "d3a485fd7784616ddb9991e9c23a302533624907d4f542f61238905b591c1946",
    "val-00000-000000.tar": "d56491d098f8694edfb104a98ae2f709a8f876c04806ed83306bd5adb516461f",
}


def _place(name: str, data: bytes) -> Path:
    """Write `data` at INPUT_DIR/name unless it is already there; atomic, because other test
    runs on the machine may place the same (identical) file at the same time."""
    path = INPUT_DIR / name
    if path.exists() and path.read_bytes() == data:
        return path
    tmp = INPUT_DIR / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _mixed_fasta(ecoli_seq: bytes) -> bytes:
    soft = bytearray(ecoli_seq[1_000_000:1_240_100])
    for a in range(7_000, 240_000, 31_000):
        soft[a : a + 4_000] = soft[a : a + 4_000].lower()
    for k, code in enumerate(b"RYKMSWBDHVnrykmswbdhv"):
        soft[500 + 997 * k] = code
    soft[60_000:61_900] = b"N" * 1_900  # one window over --max-n-fraction
    rna = bytearray(ecoli_seq[2_000_000:2_021_000].replace(b"T", b"U"))
    rna[3_000:5_000] = rna[3_000:5_000].lower()
    amino = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    codes = np.frombuffer(ecoli_seq[3_000_000:3_024_000], np.uint8).reshape(-1, 3).astype(np.int64)
    protein = bytearray(amino[(codes[:, 0] * 7 + codes[:, 1] * 3 + codes[:, 2]) % 20].tobytes())
    protein[100:140] = b"X" * 40
    # An id that JSON must escape and that holds printf-style % signs.
    odd_id = '100%d_"q"\\x_\u00e9%s'
    records = [("soft_masked chr fragment", bytes(soft)), ("rna_1", bytes(rna)), ("empty_one", b""),
               ("prot_A", bytes(protein)), ("tiny", ecoli_seq[5:300]), (odd_id, ecoli_seq[4_000_000:4_012_345])]
    out = bytearray()
    for name, seq in records:
        out += b">" + name.encode() + b"\n"
        for i in range(0, len(seq), 60):
            out += seq[i : i + 60] + b"\n"
    return bytes(out)


@pytest.fixture
def hash_inputs(lambda_phage, nmasked_contig, ecoli) -> list[Path]:
    try:
        INPUT_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        pytest.skip(f"cannot create {INPUT_DIR}: {e}")
    return [
        _place("lambda_phage.fasta.gz", lambda_phage.read_bytes()),
        _place("mixed.fa", _mixed_fasta(read_fasta(ecoli)[0][1])),
        _place("ecoli_contig_nmasked.fasta.gz", nmasked_contig.read_bytes()),
    ]


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx", ".json")}


# (workers, bases a worker may read ahead of its handover): a small budget makes workers
# pack most files as they read them, the way files larger than the budget are packed.
@pytest.mark.parametrize("workers, ahead", [(1, None), (2, None), (3, 20_000)])
def test_pack_bytes_match_stored_hashes(tmp_path, hash_inputs, monkeypatch, workers, ahead):
    if ahead is not None:
        monkeypatch.setattr(pack_workers, "_ahead_bases", lambda opts: ahead)
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", *hash_inputs, "--out", out, *OPTIONS, "--workers", workers)
    assert rc == 0, err
    got = _digests(out)
    assert {s.split("-")[0] for s in got if s.endswith(".tar")} == {"train", "val", "test"}
    assert got == EXPECTED
    shutil.rmtree(out)


def test_resume_with_workers_keeps_the_bytes(tmp_path, hash_inputs):
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", *hash_inputs, "--out", out, *OPTIONS, "--workers", "2")
    assert rc == 0, err
    shards = sorted(p.stem for p in out.glob("train-*.tar"))
    forget_completed(out, shards[0])
    (out / f"{shards[2]}.tar").write_bytes(b"")
    (out / "manifest.json").unlink()
    rc, _, err = run_cli("pack", *hash_inputs, "--out", out, *OPTIONS, "--workers", "2")
    assert rc == 0, err
    total = sum(name.endswith(".tar") for name in EXPECTED)
    assert f"{total - 2} shard(s) kept from an earlier run" in err  # not the two damaged ones
    assert _digests(out) == EXPECTED


def test_sample_members_are_tarfile_headers():
    """The shards' member headers are made without tarfile, per sample; they must stay the
    bytes tarfile (and so webdataset's TarWriter) writes, for any name and size."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        key = b"%05d-%09d-%012d-%c" % (*rng.integers(0, [10**5, 10**9, 10**12]), rng.choice([102, 114]))
        meta_len = int(rng.integers(0, 5000))
        seq_len = int(rng.choice([0, 1, 511, 512, 513, 1 << 20, rng.integers(0, 20_000)]))
        w = shards._RangeWriter.__new__(shards._RangeWriter)
        written = io.BytesIO()
        w.out, w.name, w.buf, w.index, w.tar = None, None, bytearray(), bytearray(), shards._HashingFile(written, None, 0)
        w.add(key, bytes(meta_len), b"A" * seq_len, 0)
        w.flush()
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
            for suffix, data in ((".json", bytes(meta_len)), (".seq", b"A" * seq_len)):
                info = tarfile.TarInfo(key.decode() + suffix)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "hyena-glt", "hyena-glt"
                tf.addfile(info, io.BytesIO(data))
        assert written.getvalue() == stream.getvalue()[: len(written.getvalue())]


def test_shared_shard_hash_follows_parts_as_they_land(tmp_path, monkeypatch):
    """The job hashes a shard written by several workers part by part, and the part being
    written only as far as its worker says it is on disk: bytes past that point (zeros here,
    as in a file another process is still filling) must never be hashed."""
    monkeypatch.setattr(shared_hashes.SharedShardHashes, "STEP", 64)
    rng = np.random.default_rng(0)
    final = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    tar = tmp_path / ".train-00000-000000.tar.tmp"
    tar.write_bytes(bytes(len(final)))
    ends = [300, 650, 1000]  # files 0, 1, 2 each write one part

    def land(start, end):
        with open(tar, "r+b") as f:
            f.seek(start)
            f.write(final[start:end])

    written: set[int] = set()
    hashes = shared_hashes.SharedShardHashes(tmp_path, written)
    for pos, end in enumerate(ends):
        hashes.planned(pos, file_pass.FilePlan(pos, None, True, ends={"train-00000-000000": end}))

    def drain():
        while hashes.todo:
            hashes.step()

    land(0, 120)
    hashes.landed(0, "train-00000-000000", 120)
    land(650, 800)  # file 2 is ahead of file 1: nothing of it may be hashed yet
    hashes.landed(2, "train-00000-000000", 800)
    drain()
    assert hashes.hashed["train-00000-000000"][1] == 120
    land(120, 300)
    written.add(0)
    hashes.wrote(["train-00000-000000"])
    land(300, 500)
    hashes.landed(1, "train-00000-000000", 500)
    drain()
    assert hashes.hashed["train-00000-000000"][1:] == (500, 1)
    land(500, 650)
    land(800, 1000)
    written.update({1, 2})
    shard = shards.ShardFile("train-00000-000000", "train")
    shard.length = len(final)
    assert hashes.take(shard).hexdigest() == hashlib.sha256(final).hexdigest()


# ----------------------------------------------------------------------------
# `hyena-glt pack` never imports torch: the import alone (1-3 s) would be most of a small

def test_pack_command_imports_no_torch(tmp_path, lambda_phage):
    code = ("import sys; from launch.cli import main; "
            f"rc = main(['pack', {str(lambda_phage)!r}, '--out', {str(tmp_path / 'out')!r}, '--seq-len', '512', "
            "'--workers', '2', '--progress', 'none']); "
            "print(rc, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(None, 1) == ["0", "[]\n"], proc.stdout
    assert (tmp_path / "out" / "manifest.json").exists()


def test_command_table_names_what_each_module_registers():
    """`hyena-glt CMD` imports only the module that COMMAND_MODULES names for CMD, so the
    table must list exactly the subcommands each module adds."""
    for name, commands in COMMAND_MODULES.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        assert tuple(sub.choices) == commands, name
