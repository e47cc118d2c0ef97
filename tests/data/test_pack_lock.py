"""Two `hyena-glt pack` runs into one --out: the job lock (DIR/.pack/LOCK-job-NNNNN), the
pack's state lock (DIR/.pack/LOCK), what a kill leaves, stale locks (data_tools/pack/lock.py).

The pack that must be running while another starts (or when it is killed) is held in the
middle of its work by tests/data/pack_gate/sitecustomize.py: after its N-th completed shard
(`Gated(after=N)`, 3 by default) it writes GATE/paused-PID and waits for GATE/go. So nothing
here depends on timing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from support.data import completed_shards, read_fasta, tree_bytes, write_fasta

REPO = Path(__file__).resolve().parents[2]
HYENA = [sys.executable, "-m", "launch.cli"]
GATE = Path(__file__).resolve().parent / "pack_gate"
# lambda phage (48.5 kbp) in 13 shards of 29 windows
COMMON = ["--seq-len", "128", "--shard-size-mb", "0.004", "--val-fraction", "0", "--progress", "none"]


def hyena(*args, env=None, cmd=HYENA) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)


class Gated:
    """A `hyena-glt` process held in the middle of its pack (see the module docstring)."""

    def __init__(self, tmp_path: Path, *args, cmd=HYENA, pauses: int = 1, after: int = 3):
        self.gate = tmp_path / f"gate-{len(list(tmp_path.glob('gate-*')))}"
        self.gate.mkdir()
        env = {**os.environ, "HYENA_GLT_TEST_GATE": str(self.gate), "HYENA_GLT_TEST_GATE_AFTER": str(after),
               "PYTHONPATH": os.pathsep.join(p for p in (str(GATE), os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen([*cmd, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(list(self.gate.glob("paused-*"))) < pauses:
            assert self.proc.poll() is None, f"it ended before the gate: {self.proc.communicate()}"
            assert time.monotonic() < deadline, "it never reached the gate"
            time.sleep(0.01)

    def go(self) -> tuple[int, str]:
        (self.gate / "go").touch()
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL


def leftovers(out: Path) -> list[str]:
    """Temporary files and locks under `out`: none once a pack has ended."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or "LOCK" in p.name)


def verify(out: Path) -> subprocess.CompletedProcess:
    return hyena("data", "stats", "--verify", out)


@pytest.fixture
def ref(tmp_path, lambda_phage) -> dict[str, bytes]:
    """The bytes of an uninterrupted pack of lambda phage."""
    rc, _, err = run_cli("pack", lambda_phage, "--out", tmp_path / "ref", *COMMON)
    assert rc == 0, err
    return tree_bytes(tmp_path / "ref")


def test_identical_pack_while_one_runs_is_refused(tmp_path, lambda_phage, ref):
    out = tmp_path / "out"
    first = Gated(tmp_path, "pack", lambda_phage, "--out", out, *COMMON)
    held = json.loads((out / ".pack" / "LOCK-job-00000").read_text())
    assert held["pid"] == first.proc.pid and held["host"] == socket.gethostname()
    before = tree_bytes(out)
    second = hyena("pack", lambda_phage, "--out", out, *COMMON)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"hyena-glt pack: error: --out {out} is in use by another run (host {socket.gethostname()}, PID "
        f"{first.proc.pid}, started {held['started']}); wait for it to end, or use another --out"]
    assert tree_bytes(out) == before  # the refused run touched nothing
    rc, err = first.go()
    assert rc == 0, err
    assert verify(out).returncode == 0
    assert tree_bytes(out) == ref
    assert leftovers(out) == []


def test_other_options_while_one_runs_are_refused(tmp_path, lambda_phage, ref):
    out = tmp_path / "out"
    first = Gated(tmp_path, "pack", lambda_phage, "--out", out, *COMMON)
    before = tree_bytes(out)
    # the same job: its lock refuses it
    other = hyena("pack", lambda_phage, "--out", out, *COMMON, "--seq-len", "256")
    assert other.returncode == 2 and len(other.stderr.splitlines()) == 1, other.stderr
    assert f"--out {out} is in use by another run" in other.stderr and f"PID {first.proc.pid}," in other.stderr
    # another job of another layout: the options recorded by the running pack refuse it
    other = hyena("pack", lambda_phage, "--out", out, *COMMON, "--seq-len", "256", "--num-jobs", "2",
                  "--job-index", "1")
    assert other.returncode == 2
    assert other.stderr.splitlines() == [
        f"hyena-glt pack: error: {out} holds a pack made with other options (differs in: seq_len, stride, num_jobs); "
        "use an empty --out"]
    assert tree_bytes(out) == before
    rc, err = first.go()
    assert rc == 0, err
    assert verify(out).returncode == 0
    assert tree_bytes(out) == ref


def _together(*commands) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([*HYENA, *map(str, c)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def test_packs_started_together(tmp_path, lambda_phage, ref):
    """No gate: whichever takes the lock first packs, the other is refused (or, if it starts
    once the first has ended, finds the pack done); never a broken output."""
    same = tmp_path / "same"
    results = _together(*[["pack", lambda_phage, "--out", same, *COMMON]] * 2)
    assert 0 in [r.returncode for r in results], results
    for r in results:
        assert r.returncode == 0 or (r.returncode == 2 and len(r.stderr.splitlines()) == 1
                                     and "is in use by another run" in r.stderr), r.stderr
    assert verify(same).returncode == 0 and tree_bytes(same) == ref and leftovers(same) == []

    other = tmp_path / "other"
    results = _together(*[["pack", lambda_phage, "--out", other, *COMMON, "--seq-len", n] for n in ("128", "256")])
    assert sorted(r.returncode for r in results) == [0, 2], results
    winner, loser = sorted(results, key=lambda r: r.returncode)
    assert len(loser.stderr.splitlines()) == 1 and ("is in use by another run" in loser.stderr
                                                    or "other options" in loser.stderr), loser.stderr
    assert verify(other).returncode == 0 and leftovers(other) == []
    seq_len = int(winner.args[winner.args.index("--seq-len", winner.args.index("--progress")) + 1])
    assert json.loads((other / "manifest.json").read_bytes())["options"]["seq_len"] == seq_len


@pytest.mark.parametrize("after", [1, 3, 13], ids=["first-shard", "third-shard", "last-shard"])
def test_kill_mid_pack_then_rerun(tmp_path, lambda_phage, ref, after):
    """SIGKILL after the first, the third and the last (13th) shard was completed, the last one
    just before manifest.json would be written."""
    out = tmp_path / "out"
    killed = Gated(tmp_path, "pack", lambda_phage, "--out", out, *COMMON, after=after)
    killed.kill()
    # Nothing that loads: no manifest.json, and the loaders and `data stats` say why.
    assert not (out / "manifest.json").exists()
    stats = hyena("data", "stats", out)
    assert stats.returncode == 2
    assert stats.stderr.splitlines() == [f"hyena-glt data stats: error: {out / 'manifest.json'} not found: not a "
                                         "finished pack (no job has finished)"]
    from data_tools.dataset import PackedDataset

    with pytest.raises(FileNotFoundError, match="not a finished pack"):
        PackedDataset(out)
    assert ".pack/LOCK-job-00000" in leftovers(out)
    kept = len(completed_shards(out))
    assert kept >= after - 1
    # The next run takes over the dead run's lock (one line), keeps what it completed, and
    # ends with the bytes of an uninterrupted pack.
    rerun = hyena("pack", lambda_phage, "--out", out, *COMMON)
    assert rerun.returncode == 0, rerun.stderr
    taken = [line for line in rerun.stderr.splitlines() if "stale lock" in line]
    pid = killed.proc.pid
    assert len(taken) == 1, rerun.stderr
    assert taken[0].startswith(f"pack: --out {out}: took over the stale lock of PID {pid} on {socket.gethostname()} "
                               "(started "), taken
    assert taken[0].endswith(f"): PID {pid} is not running"), taken
    assert f"{kept} shard(s) kept from an earlier run" in rerun.stderr
    assert tree_bytes(out) == ref
    assert verify(out).returncode == 0


def test_killed_rerun_over_a_complete_pack_leaves_no_manifest(tmp_path, lambda_phage):
    """A rerun whose input changed rewrites shards that the old manifest.json describes: it is
    removed before, so a kill leaves nothing that loads rather than a manifest that lies."""
    (name, seq), = read_fasta(lambda_phage)
    src = write_fasta(tmp_path / "lambda.fa", [(name, seq)])
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    rc, _, err = run_cli("pack", src, "--out", out, *COMMON)
    assert rc == 0, err
    write_fasta(src, [(name, seq[::-1])])  # same path, other bases
    rerun = Gated(tmp_path, "pack", src, "--out", out, *COMMON)
    rerun.kill()
    assert not (out / "manifest.json").exists() and not (out / ".pack" / "job-00000.json").exists()
    assert "not a finished pack" in hyena("data", "stats", out).stderr
    rc, _, err = run_cli("pack", src, "--out", out, *COMMON)
    assert rc == 0, err
    rc, _, err = run_cli("pack", src, "--out", fresh, *COMMON)
    assert rc == 0, err
    assert tree_bytes(out) == tree_bytes(fresh)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over_and_leftovers_removed(tmp_path, lambda_phage, ref):
    out = tmp_path / "out"
    lock = out / ".pack" / "LOCK-job-00000"
    lock.parent.mkdir(parents=True)
    dead = _dead_pid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "pid_started": None,
                                "started": "2020-01-01 00:00:00 UTC"}))
    for junk in (".train-00000-000003.tar.tmp", ".train-00000-000003.idx.tmp", ".manifest.json.4242.tmp",
                 ".pack/.options.json.4242.tmp", ".pack/.job-00000.json.4242.tmp"):
        (out / junk).write_bytes(b"left by a killed run")
    rc, _, err = run_cli("pack", lambda_phage, "--out", out, *COMMON)
    assert rc == 0, err
    assert [line for line in err.splitlines() if "stale lock" in line] == [
        f"pack: --out {out}: took over the stale lock of PID {dead} on {socket.gethostname()} (started "
        f"2020-01-01 00:00:00 UTC): PID {dead} is not running"]
    assert tree_bytes(out) == ref  # the leftovers are gone, the lock released

    # A lock held on another host is not the same host's to judge: refused, nothing changed.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1234, "started": "2020-01-01 00:00:00 UTC"}))
    rc, _, err = run_cli("pack", lambda_phage, "--out", out, *COMMON)
    assert rc == 2
    assert err.splitlines() == [
        f"hyena-glt pack: error: --out {out} is locked by a run on another host (host elsewhere, PID 1234, started "
        f"2020-01-01 00:00:00 UTC); if that run is really gone, delete {lock} and start again"]
    lock.unlink()
    assert tree_bytes(out) == ref


def _halves(tmp_path: Path, lambda_phage: Path) -> list[Path]:
    (name, seq), = read_fasta(lambda_phage)
    return [write_fasta(tmp_path / f"half{k}.fa", [(f"{name}_{k}", seq[k * 24_251:(k + 1) * 24_251])])
            for k in range(2)]


def test_jobs_of_one_pack_run_together_but_not_twice(tmp_path, lambda_phage):
    inputs = _halves(tmp_path, lambda_phage)
    out, ref = tmp_path / "out", tmp_path / "ref"
    for job in (1, 0):
        rc, _, err = run_cli("pack", *inputs, "--out", ref, *COMMON, "--num-jobs", "2", "--job-index", job)
        assert rc == 0, err
    job0 = Gated(tmp_path, "pack", *inputs, "--out", out, *COMMON, "--num-jobs", "2", "--job-index", "0")
    job1 = hyena("pack", *inputs, "--out", out, *COMMON, "--num-jobs", "2", "--job-index", "1")
    assert job1.returncode == 0, job1.stderr
    assert "the last job to finish" in job1.stderr and not (out / "manifest.json").exists()
    again = hyena("pack", *inputs, "--out", out, *COMMON, "--num-jobs", "2", "--job-index", "0")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"hyena-glt pack: error: --out {out} (job 0 of 2) is in use by another run (host {socket.gethostname()}, "
        f"PID {job0.proc.pid}, started {json.loads((out / '.pack' / 'LOCK-job-00000').read_text())['started']}); "
        "wait for it to end, or use another --out"]
    rc, err = job0.go()
    assert rc == 0, err
    assert f"pack job 0/2: wrote {out / 'manifest.json'}" in err
    assert verify(out).returncode == 0
    assert tree_bytes(out) == tree_bytes(ref) and leftovers(out) == []


def test_merge_waits_for_the_state_lock(tmp_path, lambda_phage):
    """Merges (the last job, --finalize, rank 0) and job starts take DIR/.pack/LOCK in turn: a
    live holder is waited for, a dead one's lock taken over."""
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", lambda_phage, "--out", out, *COMMON)
    assert rc == 0, err
    (out / "manifest.json").unlink()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom data_tools.manifest import state_lock\n"
         "with state_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(1.5)\n", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    t0 = time.monotonic()
    rc, _, err = run_cli("pack", "--finalize", out)
    assert rc == 0, err
    assert time.monotonic() - t0 > 0.5 and holder.wait(timeout=60) == 0
    assert (out / "manifest.json").exists()
    dead = _dead_pid()
    (out / ".pack" / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "x"}))
    rc, _, err = run_cli("pack", "--finalize", out)
    assert rc == 0 and f"took over the stale lock of PID {dead}" in err, err
    assert leftovers(out) == []


def _mpiexec() -> list[str]:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install mpich)")
    return [str(path), "-n", "2", *HYENA]


@pytest.mark.distributed
def test_mpiexec_rank0_locks_every_rank_job(tmp_path, lambda_phage):
    inputs = _halves(tmp_path, lambda_phage)
    out = tmp_path / "out"
    mpi = Gated(tmp_path, "pack", *inputs, "--out", out, *COMMON, cmd=_mpiexec(), pauses=2)
    held = json.loads((out / ".pack" / "LOCK-job-00001").read_text())
    assert held == json.loads((out / ".pack" / "LOCK-job-00000").read_text())  # both rank 0's
    job1 = hyena("pack", *inputs, "--out", out, *COMMON, "--num-jobs", "2", "--job-index", "1")
    assert job1.returncode == 2
    assert f"--out {out} (job 1 of 2) is in use by another run (host {held['host']}, PID {held['pid']}," in job1.stderr
    rc, err = mpi.go()
    assert rc == 0, err
    assert verify(out).returncode == 0 and leftovers(out) == []


def test_a_lock_being_written_is_not_taken_for_a_damaged_one(tmp_path):
    """O_CREAT|O_EXCL, then the JSON: a run that finds the file empty waits for its content
    (here a live process's) before it judges; a file that stays unreadable is named as such."""
    import threading

    from data_tools.dirlock import DirLock, LockError

    lock = tmp_path / "LOCK"
    lock.touch()
    live = {"host": socket.gethostname(), "pid": os.getppid(), "pid_started": None, "started": "now"}
    threading.Timer(0.3, lambda: lock.write_text(json.dumps(live))).start()
    with pytest.raises(LockError, match=f"is in use by another run .*PID {os.getppid()},"):
        DirLock(tmp_path, what="--out").acquire()
    lock.write_text("")
    with pytest.raises(LockError, match=f"its lock {lock} is unreadable; if no run uses it, delete {lock}"):
        DirLock(tmp_path, what="--out").acquire()
