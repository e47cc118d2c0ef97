"""Reproducibility, jobs, MPI and resume of `hyena-glt pack`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from support.data import (
    completed_shards,
    forget_completed,
    manifest,
    pack_samples,
    read_fasta,
    tree_bytes,
    write_fasta,
)

REPO = Path(__file__).resolve().parents[2]
HYENA = [sys.executable, "-m", "launch.cli"]
COMMON = ["--seq-len", "2048", "--stride", "1500", "--reverse-complement", "both", "--shard-size-mb", "0.2",
          "--val-fraction", "0.3", "--progress", "none",
          "--allow-empty-split"]  # seed 0 puts the 3 records in val; what is checked is reproducibility


@pytest.fixture
def inputs(tmp_path, lambda_phage, nmasked_contig, ecoli):
    name, seq = read_fasta(ecoli)[0]
    part = write_fasta(tmp_path / "ecoli_part.fa.gz", [(name, seq[:400_000])], gz=True)
    return [lambda_phage, nmasked_contig, part]


def sample_set(out: Path) -> dict[str, tuple]:
    return {k: (tuple(sorted(v["meta"].items())), v["seq"]) for k, v in pack_samples(out).items()}


def pack(inputs, out, *extra) -> int:
    rc, _, err = run_cli("pack", *inputs, "--out", out, *COMMON, *extra)
    assert rc in (0, 1), err
    return rc


def test_byte_identical_runs_and_workers(tmp_path, inputs):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    pack(inputs, a)
    pack(inputs, b, "--workers", "2")
    # Another interpreter with another hash seed: nothing may depend on Python's hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([*HYENA, "pack", *map(str, inputs), "--out", str(c), *COMMON], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    ta = tree_bytes(a)
    assert len([k for k in ta if k.endswith(".tar")]) > 5
    assert ta == tree_bytes(b)
    assert ta == tree_bytes(c)


def test_jobs_give_the_same_sample_set(tmp_path, inputs):
    one = tmp_path / "one"
    pack(inputs, one)
    reference = sample_set(one)
    ref_totals = manifest(one)["totals"]
    # 2 jobs: each takes whole files; 4 jobs (more jobs than files): records are shared out
    # in runs of windows, so several jobs pack parts of one genome.
    for num_jobs, extra in ((2, []), (4, ["--unit-mb", "0.05"])):
        out = tmp_path / f"jobs{num_jobs}"
        for job in reversed(range(num_jobs)):
            assert not (out / "manifest.json").exists()  # only the last job to finish merges
            pack(inputs, out, "--num-jobs", str(num_jobs), "--job-index", str(job), *extra)
        m = manifest(out)
        assert m["num_jobs"] == num_jobs
        jobs_with_shards = {s["path"].split("-")[1] for s in m["shards"]}
        assert len(jobs_with_shards) == num_jobs, jobs_with_shards
        assert sample_set(out) == reference
        for split, t in ref_totals.items():
            assert {k: m["totals"][split][k] for k in ("samples", "bases", "windows")} == \
                   {k: t[k] for k in ("samples", "bases", "windows")}
        assert m["dropped"] == manifest(one)["dropped"]


def test_finalize_waits_for_all_jobs(tmp_path, inputs):
    out = tmp_path / "out"
    pack(inputs, out, "--num-jobs", "2", "--job-index", "1")
    rc, _, err = run_cli("pack", "--finalize", out)
    assert rc == 2 and "jobs 0 of 2 have not finished" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli("data", "stats", out)
    assert rc == 2 and "not a finished pack" in err
    pack(inputs, out, "--num-jobs", "2", "--job-index", "0")
    (out / "manifest.json").unlink()
    rc, stdout, _ = run_cli("pack", "--finalize", out)
    assert rc == 0 and (out / "manifest.json").exists()


def _mpiexec() -> str:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install mpich)")
    return str(path)


@pytest.mark.distributed
def test_mpiexec_ranks_agree_over_mpi(tmp_path, inputs):
    one, mpi, jobs = tmp_path / "one", tmp_path / "mpi", tmp_path / "jobs"
    proc = subprocess.run([_mpiexec(), "-n", "2", *HYENA, "pack", *map(str, inputs), "--out", str(mpi), *COMMON],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # Rank 0 merged the job manifests it gathered over MPI; no rank looked for the others' on disk.
    assert "pack job 0/2: merged the job manifests of the 2 MPI ranks, gathered over MPI; wrote" in proc.stderr
    assert "pack job 1/2: job manifest gathered over MPI to rank 0, which wrote manifest.json" in proc.stderr
    assert "last job to finish" not in proc.stderr
    # The same bytes (shards, indexes, manifest, job state) as two jobs agreeing through the
    # file system, and the same samples as one job.
    for job in (1, 0):
        pack(inputs, jobs, "--num-jobs", "2", "--job-index", str(job))
    assert tree_bytes(mpi) == tree_bytes(jobs)
    m = manifest(mpi)
    assert m["num_jobs"] == 2 and {s["path"].split("-")[1] for s in m["shards"]} == {"00000", "00001"}
    pack(inputs, one)
    assert sample_set(mpi) == sample_set(one)


@pytest.mark.distributed
def test_mpiexec_ranks_refuse_to_disagree_and_report_failures(tmp_path, inputs):
    out = tmp_path / "out"
    args = ["pack", *map(str, inputs), "--out", str(out), *COMMON]
    # A rank started with other options (here invalid ones): every rank stops before anything is written.
    proc = subprocess.run([_mpiexec(), "-n", "1", *HYENA, *args, ":", "-n", "1", *HYENA, *args, "--stride", "9999"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hyena-glt pack: error: MPI rank(s) 1 of 2 were started with other inputs, --out or options than rank 0; "
        "start every rank with the same command"]
    assert not out.exists()
    # A bad input on one rank: that rank says why, rank 0 writes no manifest.json and names it.
    bad = write_fasta(tmp_path / "bad.fa", [("x", b"ACGT" * 1000)])
    bad.write_bytes(bad.read_bytes().replace(b"ACGTACGT", b"ACGT1CGT", 1))
    proc = subprocess.run([_mpiexec(), "-n", "2", *HYENA, "pack", *map(str, inputs), str(bad), "--out", str(out),
                           *COMMON], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    failed = re.findall(rf"pack job 0/2: manifest.json not written: job (\d) failed: {re.escape(str(bad))}: "
                        r"record 'x' line 2: invalid character '1'", proc.stderr)
    assert len(failed) == 1, proc.stderr
    assert not (out / "manifest.json").exists()


def test_options_change_into_same_dir_is_refused(tmp_path, inputs):
    out = tmp_path / "out"
    pack(inputs[:1], out)
    rc, _, err = run_cli("pack", inputs[0], "--out", out, *COMMON, "--seq-len", "4096")
    assert rc == 2 and "other options" in err and "seq_len" in err


def _stamp(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_resume_after_kill(tmp_path, ecoli):
    # A shard is completed (renamed, recorded) once every file with windows in it passed its
    # check, which a file does at its end: several files, so the kill falls between files.
    name, seq = read_fasta(ecoli)[0]
    parts = [write_fasta(tmp_path / f"ecoli_part{k}.fa", [(f"{name}_{k}", seq[k * 187_500 : (k + 1) * 187_500])])
             for k in range(8)]
    args = [*map(str, parts), "--seq-len", "128", "--reverse-complement", "both", "--shard-size-mb", "0.25",
            "--val-fraction", "0", "--progress", "none"]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen([*HYENA, "pack", *args, "--out", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(completed_shards(killed)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    finished = set(completed_shards(killed))
    before = _stamp(killed)

    rc, _, err = run_cli("pack", *args, "--out", killed)
    assert rc == 0, err
    assert f"{len(finished)} shard(s) kept from an earlier run" in err
    after = _stamp(killed)
    for shard in finished:  # completed shards were not written again
        assert after[f"{shard}.tar"] == before[f"{shard}.tar"]
    pack_ref_rc, _, err = run_cli("pack", *args, "--out", ref)
    assert pack_ref_rc == 0, err
    assert tree_bytes(killed) == tree_bytes(ref)
    assert len(after) > len(finished) + 3


def test_resume_from_each_partial_state(tmp_path, inputs):
    """The states a kill (or a crashed machine) can leave behind, each at once: a temporary
    file, a shard renamed but not recorded, a recorded shard that is truncated, gone, or of
    the right size but never written to disk (zeros), no job manifest."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    pack(inputs, out)
    pack(inputs, ref)
    shards = sorted(p.stem for p in out.glob("*-00000-*.tar"))
    assert len(shards) >= 6
    (out / f".{shards[0]}.tar.4242.tmp").write_bytes(b"partial")
    forget_completed(out, shards[1])
    with open(out / f"{shards[2]}.tar", "r+b") as f:
        f.truncate(1000)
    (out / f"{shards[3]}.tar").unlink()
    (out / f"{shards[3]}.idx").unlink()
    size = (out / f"{shards[4]}.tar").stat().st_size
    (out / f"{shards[4]}.tar").write_bytes(bytes(size))
    (out / "manifest.json").unlink()
    (out / ".pack" / "job-00000.json").unlink()
    untouched = {k: v for k, v in _stamp(out).items() if k.split(".")[0] not in shards[:5]}
    assert untouched
    pack(inputs, out)
    assert tree_bytes(out) == tree_bytes(ref)
    after = _stamp(out)
    assert all(after[k] == v for k, v in untouched.items())
