"""`hyena-glt pack` splits: the counts per split in the summary, a split asked for that comes
out empty (refused, or a warning for the default split), and holding out part of a record
(`--split-by position`, `--val-regions BED`) so that a genome of one record has a val split
and no training window shares a base with a held-out window."""

from __future__ import annotations

import gzip
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from support.data import manifest, pack_samples, read_fasta, tree_bytes, write_fasta

from data_tools import holdout

REPO = Path(__file__).resolve().parents[2]
HYENA = [sys.executable, "-m", "launch.cli"]
LAMBDA_ID = "gi|9626243|ref|NC_001416.1|"


def windows_of(length: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    out, s = [], 0
    while True:
        out.append((s, min(s + seq_len, length)))
        if s + seq_len >= length:
            return out
        s += stride


def by_split(out: Path, record_id: str | None = None) -> dict[str, list[tuple[int, int]]]:
    """(start, end) of the + strand windows of each split (of one record)."""
    got: dict[str, list[tuple[int, int]]] = {}
    for smp in pack_samples(out).values():
        m = smp["meta"]
        if m["strand"] == "+" and (record_id is None or m["record_id"] == record_id):
            got.setdefault(m["split"], []).append((m["start"], m["end"]))
    return {k: sorted(v) for k, v in got.items()}


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def pack(*args) -> tuple[int, str]:
    rc, _, err = run_cli("pack", *args, "--progress", "none")
    return rc, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


# ---------------------------------------------------------------------------- acceptance: one record


# Splits per record put lambda's one record whole in val (seed 12: u = 0.099) or in train (seed 0: u = 0.233).
@pytest.mark.parametrize("seed, fraction, empty", [(0, 0.05, "val"), (12, 0.1, "train"), (0, 0.3, "train")])
def test_one_record_val_fraction_gives_val_or_one_line_refusal(tmp_path, lambda_phage, seed, fraction, empty):
    """A chromosome-like genome (one record) with --val-fraction: a split per record leaves val
    or train empty, so the pack is refused with one line saying why and what to do, and no
    manifest.json (a pack without the split asked for is not handed on to training)."""
    out = tmp_path / "out"
    rc, err = pack(lambda_phage, "--out", out, "--seq-len", "1000", "--val-fraction", fraction, "--seed", seed)
    assert rc == 2, err
    [line] = error_lines(err)
    assert line.startswith(f"hyena-glt pack: error: {empty} is empty: ")
    assert "1 record(s)" in line and "hold out part of each record with --split-by position" in line
    assert line.endswith("so manifest.json was not written: rerun into an empty --out, or add --allow-empty-split "
                         "to this command to write it anyway")
    assert not (out / "manifest.json").exists()


def test_one_record_position_holdout_gives_val(tmp_path, lambda_phage):
    out = tmp_path / "out"
    rc, err = pack(lambda_phage, "--out", out, "--seq-len", "1000", "--val-fraction", "0.05", "--split-by", "position")
    assert rc == 0, err
    m = manifest(out)
    n = len(windows_of(48502, 1000, 1000))
    assert m["totals"]["val"]["windows"] == round(0.05 * n) and m["totals"]["train"]["windows"] == n - round(0.05 * n)
    assert m["totals"]["val"]["records"] == m["totals"]["train"]["records"] == 1
    assert m["options"]["split_by"] == "position"
    assert m["holdout"] == {"mode": "position", "rule": holdout.POSITION_RULE, "overlap_windows": 0}
    assert "error" not in err and "warning" not in err


# ---------------------------------------------------------------------------- the summary


def test_summary_prints_counts_per_split(tmp_path, ecoli):
    _, seq = read_fasta(ecoli)[0]
    fa = write_fasta(tmp_path / "parts.fa", [(f"part{k}", seq[k * 20_000 : (k + 1) * 20_000]) for k in range(20)])
    out = tmp_path / "out"
    rc, err = pack(fa, "--out", out, "--seq-len", "2000", "--val-fraction", "0.3", "--test-fraction", "0.2",
                   "--reverse-complement", "both")
    assert rc == 0, err
    t = manifest(out)["totals"]
    assert all(t[s]["samples"] for s in ("train", "val", "test"))
    [line] = [x for x in err.splitlines() if x.startswith("pack: splits: ")]
    assert line == "pack: splits: " + "; ".join(
        f"{s} {t[s]['samples']} samples ({t[s]['windows']} windows, {t[s]['bases']} bases, {t[s]['records']} record(s))"
        for s in ("train", "val", "test"))


def test_summary_of_jobs_and_of_the_whole_pack(tmp_path, ecoli):
    _, seq = read_fasta(ecoli)[0]
    files = [write_fasta(tmp_path / f"p{k}.fa", [(f"p{k}", seq[k * 30_000 : (k + 1) * 30_000])]) for k in range(4)]
    out = tmp_path / "out"
    errs = []
    for job in (0, 1):
        rc, err = pack(*files, "--out", out, "--seq-len", "3000", "--val-fraction", "0.1", "--split-by", "position",
                       "--num-jobs", "2", "--job-index", job)
        assert rc == 0, err
        errs.append(err)
    t = manifest(out)["totals"]
    assert t["val"]["records"] == t["train"]["records"] == 4 and t["val"]["windows"] == 4
    # Each job: its own share; the last one also the pack's.
    assert "pack job 0/2: this job's splits: train " in errs[0] and "the whole pack" not in errs[0]
    [whole] = [x for x in errs[1].splitlines() if x.startswith("pack job 1/2: the whole pack's splits: ")]
    assert whole.endswith(f"train {t['train']['samples']} samples ({t['train']['windows']} windows, "
                          f"{t['train']['bases']} bases, 4 record(s)); val {t['val']['samples']} samples "
                          f"({t['val']['windows']} windows, {t['val']['bases']} bases, 4 record(s))")


# ---------------------------------------------------------------------------- empty splits


def test_empty_split_asked_for_is_refused_default_one_warns(tmp_path, lambda_phage):
    # Seed 0 puts lambda's one record in train.
    common = [lambda_phage, "--seq-len", "5000"]
    rc, err = pack(*common, "--out", tmp_path / "default")
    assert rc == 0, err
    [warning] = [x for x in err.splitlines() if "warning" in x]
    assert warning.startswith("pack: warning: val is empty: --val-fraction 0.01 is a share of whole records")
    assert manifest(tmp_path / "default")["totals"].keys() == {"train"}

    refused = tmp_path / "refused"
    rc, err = pack(*common, "--out", refused, "--val-fraction", "0.02")
    assert rc == 2 and not (refused / "manifest.json").exists()
    assert len(error_lines(err)) == 1 and "pack: splits: train 10 samples" in err and "val empty" in err
    # Readers say why there is no manifest; --finalize refuses alike, and writes it when allowed.
    rc, _, serr = run_cli("data", "stats", refused)
    assert rc == 2 and "a split the pack was asked for is empty?); hyena-glt pack --finalize" in serr
    rc, _, ferr = run_cli("pack", "--finalize", refused)
    assert rc == 2 and len(ferr.strip().splitlines()) == 1 and "val is empty" in ferr
    rc, fout, ferr = run_cli("pack", "--finalize", refused, "--allow-empty-split")
    assert rc == 0 and "splits: train 10 samples" in fout and "warning: val is empty" in ferr
    assert manifest(refused)["totals"].keys() == {"train"}

    # --allow-empty-split: the same command in the same --out keeps the shards and writes the manifest.
    (refused / "manifest.json").unlink()
    rc, err = pack(*common, "--out", refused, "--val-fraction", "0.02", "--allow-empty-split")
    assert rc == 0 and "1 shard(s) kept from an earlier run" in err and "warning: val is empty" in err
    assert not error_lines(err)
    assert (refused / "manifest.json").exists()

    # A train split asked for (1 - 0.9 of the records) that comes out empty is refused too.
    rc, err = pack(*common, "--out", tmp_path / "no_train", "--val-fraction", "0.9")
    assert rc == 2
    [line] = error_lines(err)
    assert "train is empty" in line and "--split-by position" in line


def test_position_holdout_too_short_records_refused_with_the_size_needed(tmp_path, lambda_phage):
    # 6 windows of 8192: round(0.05 x 6) = 0 val windows.
    rc, err = pack(lambda_phage, "--out", tmp_path / "o", "--seq-len", "8192", "--split-by", "position",
                   "--val-fraction", "0.05")
    assert rc == 2
    [line] = error_lines(err)
    assert "val is empty: --split-by position holds out round(0.05 x windows) of each record" in line
    assert "a record needs 10 windows of --seq-len 8192" in line


def test_nothing_packed_is_said_so(tmp_path):
    fa = write_fasta(tmp_path / "short.fa", [("tiny", b"ACGT" * 10)])
    rc, err = pack(fa, "--out", tmp_path / "o", "--val-fraction", "0")
    assert rc == 2
    [line] = error_lines(err)
    assert "nothing was packed: every window was dropped" in line


def test_val_regions_matching_no_record_refused(tmp_path, lambda_phage):
    bed = write_bed(tmp_path / "r.bed", ["chrX\t0\t10", "chrY\t0\t10"])
    rc, err = pack(lambda_phage, "--out", tmp_path / "o", "--seq-len", "1000", "--val-regions", bed)
    assert rc == 2
    [line] = error_lines(err)
    assert f"val is empty: no window overlaps an interval of --val-regions {bed}: none of its record names " \
           "('chrX', 'chrY') is a record id of the inputs (the first word of a FASTA header)" in line


# ---------------------------------------------------------------------------- --split-by position


@pytest.mark.parametrize("seq_len, stride, val, test", [(1000, 1000, 0.1, 0.0), (1000, 300, 0.1, 0.05),
                                                        (2048, 512, 0.2, 0.2), (700, 699, 0.5, 0.5)])
def test_position_holdout_blocks_never_share_a_base_with_train(tmp_path, lambda_phage, seq_len, stride, val, test):
    out = tmp_path / "out"
    rc, err = pack(lambda_phage, "--out", out, "--seq-len", seq_len, "--stride", stride, "--min-len", "1",
                   "--split-by", "position", "--val-fraction", val, "--test-fraction", test, "--allow-empty-split")
    assert rc == 0, err
    got = by_split(out)
    all_windows = windows_of(48502, seq_len, stride)
    n, gap = len(all_windows), -(-seq_len // stride) - 1
    held = [w for s in ("val", "test") for w in got.get(s, [])]
    for w in got.get("train", []):
        assert not any(overlaps(w, h) for h in held), w
    for v in got.get("val", []):
        assert not any(overlaps(v, t) for t in got.get("test", []))
    # Each held-out split is one contiguous run of windows, of round(fraction x windows).
    index = {w: k for k, w in enumerate(all_windows)}
    for split, f in (("val", val), ("test", test)):
        ks = [index[w] for w in got.get(split, [])]
        assert ks == list(range(ks[0], ks[0] + len(ks))) if ks else True
        if split == "val":
            assert len(ks) == int(f * n + 0.5)
    # Every window is kept in a split or dropped for overlapping a held-out one.
    m = manifest(out)
    kept = sum(len(v) for v in got.values())
    assert m["windows"]["planned"]["windows"] == n
    assert m["dropped"]["holdout_overlap"]["windows"] == n - kept
    assert n - kept <= 3 * gap and m["holdout"]["overlap_windows"] == gap


# ---------------------------------------------------------------------------- --val-regions


def write_bed(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_val_regions_hold_out_intervals(tmp_path, lambda_phage, ecoli):
    _, seq = read_fasta(ecoli)[0]
    eco = write_fasta(tmp_path / "eco.fa", [("eco_a", seq[:60_000]), ("eco_b", seq[60_000:90_000])])
    intervals = {LAMBDA_ID: [(10_000, 10_500), (30_000, 32_000), (31_500, 33_000), (48_000, 48_502)],
                 "eco_a": [(0, 1), (20_123, 20_124)]}
    bed = write_bed(tmp_path / "held.bed.gz", [
        "track name=held", "# a comment", "",
        *(f"{rid}\t{a}\t{b}\tname\t0\t+" for rid, iv in intervals.items() for a, b in iv)], gz=True)
    out = tmp_path / "out"
    rc, err = pack(lambda_phage, eco, "--out", out, "--seq-len", "1000", "--stride", "400", "--min-len", "1",
                   "--val-regions", bed, "--reverse-complement", "both")
    assert rc == 0, err
    m = manifest(out)
    for rid, length in ((LAMBDA_ID, 48502), ("eco_a", 60_000), ("eco_b", 30_000)):
        got = by_split(out, rid)
        regions = intervals.get(rid, [])
        for w in got.get("train", []):  # no training window overlaps a held-out interval or a val window
            assert not any(overlaps(w, r) for r in regions), (rid, w)
            assert not any(overlaps(w, v) for v in got.get("val", [])), (rid, w)
        for v in got.get("val", []):  # val windows are those overlapping an interval
            assert any(overlaps(v, r) for r in regions)
        for a, b in regions:  # and they cover it
            assert all(any(s <= x < e for s, e in got["val"]) for x in range(a, b)), (rid, a, b)
        everything = windows_of(length, 1000, 400)
        assert set(got.get("val", [])) == {w for w in everything if any(overlaps(w, r) for r in regions)}
        assert len(got.get("train", [])) + len(got.get("val", [])) <= len(everything)
    assert by_split(out, "eco_b").keys() == {"train"}
    assert m["options"]["val_fraction"] == 0
    assert m["options"]["val_regions"] == {"path": str(bed), "sha256": holdout.sha256_or_none(str(bed))}
    assert m["holdout"] == {"mode": "val_regions", "overlap_windows": 2,
                            "val_regions": {"path": str(bed), "sha256": holdout.sha256_or_none(str(bed)),
                                            "records": 2, "intervals": 6, "bases": 500 + 3000 + 502 + 2,
                                            "records_not_found": []}}
    assert m["totals"]["val"]["records"] == 2 and m["totals"]["train"]["records"] == 3
    planned, kept = m["windows"]["planned"]["windows"], m["windows"]["kept"]["windows"]
    assert planned - kept == m["dropped"]["holdout_overlap"]["windows"] > 0


def test_val_regions_naming_absent_records_warn(tmp_path, lambda_phage):
    bed = write_bed(tmp_path / "r.bed", [f"{LAMBDA_ID}\t100\t200", "chr1\t5\t10", "chr2 5 10"])
    rc, err = pack(lambda_phage, "--out", tmp_path / "o", "--seq-len", "1000", "--val-regions", bed)
    assert rc == 0, err
    [warning] = [x for x in err.splitlines() if "warning" in x]
    assert warning == (f"pack: warning: 2 of the 3 record(s) of --val-regions {bed} are not among the inputs' records "
                       "('chr1', 'chr2'); their intervals hold nothing out")
    assert manifest(tmp_path / "o")["holdout"]["val_regions"]["records_not_found"] == ["chr1", "chr2"]


@pytest.mark.parametrize("lines, message", [
    (["chr1\t5"], "line 1: expected at least 3 fields (record start end), got 2"),
    (["# header", "chr1\tfive\t10"], "line 2: start 'five' is not a whole number"),
    (["chr1\t5\t10", "chr1\t-5\t10"], "line 2: start -5 is negative"),
    (["chr1\t10\t10"], "line 1: empty interval (end 10 <= start 10)"),
    (["track x", ""], "no intervals (expected lines of: record start end"),
    ([f"{LAMBDA_ID}\t48000\t48503"], (f"line 1: interval {LAMBDA_ID}:48000-48503 runs past the end of record "
                                      f"'{LAMBDA_ID}' (48502 bases) in ")),
])
def test_bad_val_regions_one_line_naming_file_and_line(tmp_path, lambda_phage, lines, message):
    bed = write_bed(tmp_path / "bad.bed", lines)
    other = write_fasta(tmp_path / "other.fa", [("other", read_fasta(lambda_phage)[0][1][:5000])])
    # Two files and two workers: an interval past a record's end is found in a worker.
    rc, err = pack(lambda_phage, other, "--out", tmp_path / "o", "--seq-len", "1000", "--val-regions", bed,
                   "--workers", "2")
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"hyena-glt pack: error: {bed}: {message}"), err
    assert len(error_lines(err)) == 1


def test_val_regions_option_conflicts(tmp_path, lambda_phage):
    bed = write_bed(tmp_path / "r.bed", [f"{LAMBDA_ID}\t100\t200"])
    for extra, message in ((["--val-fraction", "0.1"], "--val-regions defines the val split"),
                           (["--split-by", "position"], "give one of them")):
        rc, err = pack(lambda_phage, "--out", tmp_path / "o", "--val-regions", bed, *extra)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    rc, err = pack(lambda_phage, "--out", tmp_path / "o", "--val-regions", tmp_path / "missing.bed")
    assert rc == 2 and "--val-regions: no such file" in err
    # Another BED in the same --out is other options.
    rc, err = pack(lambda_phage, "--out", tmp_path / "p", "--seq-len", "1000", "--val-regions", bed)
    assert rc == 0, err
    write_bed(bed, [f"{LAMBDA_ID}\t100\t300"])
    rc, err = pack(lambda_phage, "--out", tmp_path / "p", "--seq-len", "1000", "--val-regions", bed)
    assert rc == 2 and "other options (differs in: val_regions)" in err


# ---------------------------------------------------------------------------- reproducible across jobs


def sample_set(out: Path) -> dict:
    return {k: (tuple(sorted(v["meta"].items())), v["seq"]) for k, v in pack_samples(out).items()}


@pytest.fixture
def inputs(tmp_path, lambda_phage, ecoli):
    _, seq = read_fasta(ecoli)[0]
    part = write_fasta(tmp_path / "eco.fa", [("eco_a", seq[:300_000]), ("eco_b", seq[300_000:340_000])])
    bed = write_bed(tmp_path / "held.bed", [f"{LAMBDA_ID}\t20000\t25000", "eco_a\t1000\t9000", "eco_a\t150000\t150001",
                                            "eco_a\t299000\t300000"])
    return [lambda_phage, part], bed


@pytest.mark.parametrize("mode", ["position", "regions"])
def test_holdout_same_samples_for_workers_and_jobs(tmp_path, inputs, mode):
    files, bed = inputs
    split = ["--split-by", "position", "--val-fraction", "0.1", "--test-fraction", "0.05"] if mode == "position" else \
        ["--val-regions", bed, "--test-fraction", "0.3", "--seed", "1"]
    common = [*files, "--seq-len", "2048", "--stride", "700", "--reverse-complement", "both", "--shard-size-mb",
              "0.2", *split, "--allow-empty-split"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert pack(*common, "--out", one)[0] == 0
    assert pack(*common, "--out", two, "--workers", "2")[0] == 0
    assert tree_bytes(one) == tree_bytes(two)
    reference, ref = sample_set(one), manifest(one)
    assert {"train", "val"} <= set(ref["totals"])
    # 2 jobs: whole files; 5 jobs (more jobs than files): records shared out in runs of windows.
    for num_jobs, extra in ((2, []), (5, ["--unit-mb", "0.03"])):
        out = tmp_path / f"jobs{num_jobs}"
        for job in reversed(range(num_jobs)):
            assert pack(*common, "--out", out, "--num-jobs", num_jobs, "--job-index", job, *extra)[0] == 0
        m = manifest(out)
        assert sample_set(out) == reference
        assert m["totals"] == {s: {**t, "shards": m["totals"][s]["shards"]} for s, t in ref["totals"].items()}
        assert m["dropped"] == ref["dropped"] and m["holdout"] == ref["holdout"]


@pytest.mark.distributed
def test_holdout_mpiexec_equals_array_jobs(tmp_path, inputs):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    files, bed = inputs
    common = [*map(str, files), "--seq-len", "2048", "--stride", "700", "--val-regions", str(bed), "--unit-mb", "0.05",
              "--progress", "none"]
    mpi, jobs = tmp_path / "mpi", tmp_path / "jobs"
    proc = subprocess.run([str(mpiexec), "-n", "3", *HYENA, "pack", *common, "--out", str(mpi)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    for job in (2, 1, 0):
        rc, _, err = run_cli("pack", *common, "--out", jobs, "--num-jobs", 3, "--job-index", job)
        assert rc == 0, err
    assert tree_bytes(mpi) == tree_bytes(jobs)
    # A refusal under mpiexec: one line from rank 0, every rank exits 2, no manifest.json.
    refused = tmp_path / "refused"
    proc = subprocess.run([str(mpiexec), "-n", "2", *HYENA, "pack", str(files[0]), "--seq-len", "5000",
                           "--val-fraction", "0.02", "--progress", "none", "--out", str(refused)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "val is empty" in proc.stderr
    assert "wrote" not in proc.stderr and not (refused / "manifest.json").exists()


# ---------------------------------------------------------------------------- the geometry, exhaustively


def _check_runs(runs, n: int, seq_len: int, stride: int, length: int, regions=()) -> None:
    assert runs[0][0] == 0 and runs[-1][1] == n
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(runs))
    wins = windows_of(length, seq_len, stride)
    assert len(wins) == n
    split = [s for a, b, s in runs for _ in range(a, b)]
    held = [wins[k] for k in range(n) if split[k] in ("val", "test")]
    for k in range(n):
        if split[k] == "train":
            assert not any(overlaps(wins[k], h) for h in held)
            assert not any(overlaps(wins[k], r) for r in regions)
        elif split[k] is None:  # dropped only when it must be
            assert any(overlaps(wins[k], h) for h in held)
        if regions:
            assert (split[k] == "val") == any(overlaps(wins[k], r) for r in regions)


def test_runs_geometry_random(tmp_path):
    rng = random.Random(0)
    for trial in range(400):
        seq_len = rng.randint(1, 60)
        stride = rng.randint(1, seq_len)
        length = rng.randint(1, 600)
        n, gap = len(windows_of(length, seq_len, stride)), holdout.overlap_windows(seq_len, stride)
        val, test = rng.choice([0, 0.01, 0.1, 0.3, 0.5]), rng.choice([0, 0.05, 0.2, 0.5])
        runs = holdout.position_runs(f"r{trial}", n, trial, val, test, gap)
        _check_runs(runs, n, seq_len, stride, length)
        assert sum(b - a for a, b, s in runs if s == "val") == int(val * n + 0.5)
        regions = []
        for _ in range(rng.randint(1, 4)):
            a = rng.randrange(length)
            regions.append((a, rng.randint(a + 1, min(length, a + 80))))
        bed = write_bed(tmp_path / "r.bed", [f"rec\t{a}\t{b}" for a, b in regions])
        runs = holdout.Regions(str(bed)).runs("rec", length, n, seq_len, stride, gap, "x.fa")
        _check_runs(runs, n, seq_len, stride, length, regions)
