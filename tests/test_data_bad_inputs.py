"""Every bad input either works as documented (README "Data tools" table) or fails with
one line naming the file; --skip-bad-files skips and records it, with exit code 1."""

from __future__ import annotations

import bz2
import gzip
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from test_data_support import manifest, pack_samples, read_fasta, run_cli, write_fasta

REPO = Path(__file__).resolve().parents[1]
OPTS = ["--seq-len", "1000", "--min-len", "1", "--val-fraction", "0", "--progress", "none"]


def bgzip(data: bytes) -> bytes:
    """BGZF: gzip members of <= 64 KiB with a 'BC' extra field, plus the empty EOF block."""
    def block(chunk: bytes) -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        comp = c.compress(chunk) + c.flush()
        head = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 6) + b"BC" + struct.pack("<HH", 2, 25 + len(comp))
        return head + comp + struct.pack("<II", zlib.crc32(chunk), len(chunk))

    return b"".join(block(data[i : i + 65280]) for i in range(0, len(data), 65280)) + block(b"")


@pytest.fixture
def lam(lambda_phage):
    return read_fasta(lambda_phage)[0]


def one_line_error(rc: int, err: str, path: Path, *words: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0], err
    for w in words:
        assert w in lines[0], err


def make_bad(kind: str, d: Path, lambda_gz: Path, lam) -> Path:
    name, seq = lam
    if kind == "truncated_gzip":
        p = d / "truncated.fa.gz"
        p.write_bytes(lambda_gz.read_bytes()[:7000])
    elif kind == "binary":
        p = d / "binary.fa"
        p.write_bytes(zlib.compress(seq))  # compressed bytes without a gzip header
    elif kind == "not_fasta":
        p = d / "notes.fa"
        p.write_text("Sequencing run notes\nlane 1: ok\n")
    elif kind == "fastq":
        p = d / "reads.fa"
        p.write_bytes(b"@read1\n" + seq[:50] + b"\n+\n" + b"I" * 50 + b"\n")
    elif kind == "empty":
        p = d / "empty.fa"
        p.write_bytes(b"")
    elif kind == "empty_gzip":
        p = d / "empty.fa.gz"
        p.write_bytes(gzip.compress(b"\n"))
    elif kind == "digits":
        p = d / "genbank_style.fa"
        p.write_bytes(b">x\n" + seq[:120] + b"\n1 " + seq[120:180] + b"\n")
    elif kind == "space":
        p = d / "spaces.fa"
        p.write_bytes(b">a\n" + seq[:100] + b"\n>b\n" + seq[:60] + b" \n")
    elif kind == "id_not_utf8":
        p = d / "latin1_ids.fa"
        p.write_bytes(b">a\n" + seq[:100] + b"\n>caf\xe9 description\n" + seq[:60] + b"\n")
    elif kind == "bzip2":
        p = d / "lambda.fa.bz2"
        p.write_bytes(bz2.compress(b">x\n" + seq + b"\n"))
    else:
        raise AssertionError(kind)
    return p


BAD = {
    "truncated_gzip": ("truncated gzip file", "line"),
    "binary": ("binary content",),
    "not_fasta": ("not a FASTA file", "line 1"),
    "fastq": ("FASTQ",),
    "empty": ("empty file",),
    "empty_gzip": ("empty file",),
    "digits": ("record 'x' line 3", "'1'"),
    "space": ("record 'b' line 4", "space"),
    "bzip2": ("bzip2",),
    "id_not_utf8": ("line 3: the record id is not UTF-8", "0xe9"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_fails_with_one_line(kind, tmp_path, lambda_phage, lam):
    bad = make_bad(kind, tmp_path, lambda_phage, lam)
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", lambda_phage, bad, "--out", out, *OPTS)
    one_line_error(rc, err, bad, *BAD[kind])
    assert not (out / "manifest.json").exists()

    rc, _, err = run_cli("pack", lambda_phage, bad, "--out", tmp_path / "skip", *OPTS, "--skip-bad-files")
    assert rc == 1, err  # finished, but not everything was processed
    m = manifest(tmp_path / "skip")
    assert [s["path"] for s in m["skipped_files"]] == [str(bad)]
    assert BAD[kind][0] in m["skipped_files"][0]["reason"]
    assert m["input_totals"]["bases"] == len(lam[1])  # the good file is packed in full
    assert b"".join(s["seq"] for _, s in sorted(pack_samples(tmp_path / "skip").items())) == lam[1]
    rc, stdout, _ = run_cli("data", "stats", tmp_path / "skip")
    assert rc == 0 and f"SKIPPED {bad}" in stdout


def test_truncated_gzip_through_the_installed_command(tmp_path, lambda_phage, lam):
    bad = make_bad("truncated_gzip", tmp_path, lambda_phage, lam)
    exe = Path(sys.executable).parent / "hyena-glt"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "launch.cli"]
    proc = subprocess.run([*cmd, "pack", str(bad), "--out", str(tmp_path / "o"), *OPTS],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    one_line_error(proc.returncode, proc.stderr, bad, "truncated gzip")


def test_missing_inputs_fail_with_one_line(tmp_path):
    for spec in (tmp_path / "nope.fa", tmp_path / "*.fasta"):
        rc, _, err = run_cli("pack", spec, "--out", tmp_path / "o", *OPTS)
        one_line_error(rc, err, spec)
    (tmp_path / "emptydir").mkdir()
    rc, _, err = run_cli("pack", tmp_path / "emptydir", "--out", tmp_path / "o", *OPTS)
    one_line_error(rc, err, tmp_path / "emptydir", "no FASTA files")
    lst = tmp_path / "inputs.txt"
    lst.write_text("# my inputs\nmissing.fa\n")
    rc, _, err = run_cli("pack", lst, "--out", tmp_path / "o", *OPTS)
    one_line_error(rc, err, lst, "line 2")


def test_bad_option_fails_with_one_line(tmp_path, lambda_phage):
    rc, _, err = run_cli("pack", lambda_phage, "--out", tmp_path / "o", "--max-n-fraction", "1.5")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--max-n-fraction" in err


def _pack_seqs(out: Path) -> dict[tuple[str, int], bytes]:
    return {(s["meta"]["record_id"], s["meta"]["start"]): s["seq"] for s in pack_samples(out).values()}


def test_inputs_that_work(tmp_path, lambda_phage, ecoli, lam):
    """CRLF, one very long line, bgzip, multi-member gzip, an empty record, T+U in one
    record, and a directory / glob / list file as INPUT: all give the same bases."""
    name, seq = lam
    eco = read_fasta(ecoli)[0][1][:300_000]
    d = tmp_path / "in"
    d.mkdir()
    plain = write_fasta(d / "plain.fa", [(name, seq)], width=70)
    crlf = write_fasta(d / "crlf.fa", [(name, seq)], width=70, crlf=True)
    long_line = write_fasta(d / "long.fa", [("eco", eco)], width=0)  # 300 kb on one line
    (d / "bgzipped.fa.gz").write_bytes(bgzip(b">eco\n" + eco + b"\n"))
    (d / "multi.fa.gz").write_bytes(gzip.compress(b">eco\n" + eco[:150_000] + b"\n") + gzip.compress(eco[150_000:] + b"\n"))
    mixed = d / "records.fa"
    mixed.write_bytes(b">empty1 no sequence\n>real\n" + seq[:3000] + b"\n>tu\nACGTUACGU\n>empty2\n")

    def run(*inp, extra=()):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*')))}"
        rc, _, err = run_cli("pack", *inp, "--out", out, *OPTS, *extra)
        return rc, err, out

    rc, _, ref = run(plain)
    rc2, _, crlf_out = run(crlf)
    assert rc == rc2 == 0 and _pack_seqs(crlf_out) == _pack_seqs(ref)
    outs = [run(p)[2] for p in (long_line, d / "bgzipped.fa.gz", d / "multi.fa.gz")]
    assert _pack_seqs(outs[0]) == _pack_seqs(outs[1]) == _pack_seqs(outs[2])
    assert b"".join(v for _, v in sorted(_pack_seqs(outs[0]).items())) == eco
    assert [e["compression"] for e in manifest(outs[1])["inputs"]] == ["bgzip"]

    rc, err, out = run(mixed)
    assert rc == 0
    assert "record 'empty1'" in err and "record 'empty2'" in err and "no sequence" in err
    m = manifest(out)
    assert m["dropped"]["empty_record"]["records"] == 2 and m["input_totals"]["records"] == 4
    metas = {s["meta"]["record_id"]: s["meta"] for s in pack_samples(out).values()}
    assert set(metas) == {"real", "tu"} and metas["tu"]["seq_type"] == "mixed"

    lst = tmp_path / "list.txt"
    lst.write_text(f"{plain}\n# comment\n\nin/{crlf.name}\n")  # relative paths: from the list's folder
    rc, _, out = run(lst)
    assert rc == 0 and [e["path"] for e in manifest(out)["inputs"]] == [str(plain), str(crlf)]
    rc, _, out = run(d)  # a directory: every FASTA in it, sorted
    assert rc == 0 and [Path(e["path"]).name for e in manifest(out)["inputs"]] == \
        ["bgzipped.fa.gz", "crlf.fa", "long.fa", "multi.fa.gz", "plain.fa", "records.fa"]
    rc, _, out = run(str(d / "*.fa.gz"))
    assert rc == 0 and len(manifest(out)["inputs"]) == 2


def test_read_only_inputs_get_no_index_files(tmp_path, lambda_phage):
    before = sorted(p.name for p in lambda_phage.parent.iterdir())
    rc, _, _ = run_cli("pack", lambda_phage, "--out", tmp_path / "o", *OPTS)
    assert rc == 0 and sorted(p.name for p in lambda_phage.parent.iterdir()) == before


def test_skipped_file_leaves_nothing_behind(tmp_path, lambda_phage, ecoli, lam):
    """A truncated gzip between good files: pyfastx alone would return its first part as a
    shortened record; with --skip-bad-files none of it may reach a shard, while shards of
    the file before it are kept and the file after it is packed."""
    eco = read_fasta(ecoli)[0][1]
    good2 = write_fasta(tmp_path / "good2.fa", [("good2", eco[-200_000:])])
    bad = tmp_path / "cut.fa.gz"
    bad.write_bytes(gzip.compress(b">cut\n" + eco[:1_000_000] + b"\n")[:200_000])
    out = tmp_path / "out"
    args = ["--seq-len", "1000", "--shard-size-mb", "0.02", "--val-fraction", "0", "--progress", "none", "--workers", "2"]
    rc, _, err = run_cli("pack", lambda_phage, bad, good2, "--out", out, *args, "--skip-bad-files")
    assert rc == 1, err
    assert f"SKIPPED {bad}: truncated gzip" in err
    samples = pack_samples(out)
    assert {s["meta"]["record_id"] for s in samples.values()} == {lam[0], "good2"}
    m = manifest(out)
    assert m["input_totals"]["bases"] == len(lam[1]) + 200_000
    assert sum(s["bases"] for s in m["shards"]) == len(lam[1]) + 200_000
    assert set(p.name for p in out.glob("*.tar")) == {s["path"] for s in m["shards"]}
    rc, _, err = run_cli("pack", lambda_phage, bad, good2, "--out", tmp_path / "strict", *args)
    one_line_error(rc, err, bad, "truncated gzip")
