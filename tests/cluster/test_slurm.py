"""launch/cluster/slurm.sbatch and launch/cluster/slurm_pack.sbatch under a real SLURM (tests/support/slurm_cluster.py:
two nodes, node1 and node2, each a network namespace with 1 CPU and a slurmd; slurmctld on node1), submitted with
sbatch as a user would.

* Training: a 2-node job, one rank per node (srun, gloo over the namespaces' network, CPU), is sent SIGUSR1 the way
  `--signal=B:USR1@N` does before its time limit; it saves, requeues itself, and the requeued job resumes. The
  per-step losses of the whole run equal those of an uninterrupted job (exact resume: same layout), and those equal
  a one-process run of the same config.
* Packing: `sbatch --array=0-1` packs with each task's share taken from SLURM's array
  variables; the result equals the same two jobs run by hand with --num-jobs/--job-index, and
  holds the same samples as a one-job pack.
The cluster is installed (apt-get) and started once per session; only these tests need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support import slow_saves_env
from support.slurm_cluster import LocalSlurm, Unavailable

REPO = Path(__file__).resolve().parents[2]
HYENA_GLT = str(Path(sys.executable).parent / "hyena-glt")
STEPS = 10


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    except Unavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _env(**extra) -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HYENA_GLT": HYENA_GLT,
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


@pytest.fixture(scope="module")
def packs(tiny_packs):
    return tiny_packs


def _overrides(packs: Path, out: Path) -> list[str]:
    return [f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.warmup_steps=1", "train.eval_batches=2", "train.eval_every=0", f"data.train={packs / 'train'}",
            f"data.val={packs / 'val'}", f"out_dir={out}", f"checkpoint.dir={out / 'ckpt'}", "checkpoint.every=2"]


def _submit_training(slurm: LocalSlurm, packs: Path, out: Path, **env) -> str:
    return slurm.sbatch(
        # the script's #SBATCH lines are for a GPU cluster: one CPU rank on each of the 2 nodes here
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15",
        f"--output={out}.log", str(REPO / "launch" / "cluster" / "slurm.sbatch"), str(REPO / "configs" / "tiny.yaml"),
        *_overrides(packs, out), env=_env(**env))


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _assert_same_losses(got: list[tuple[int, float]], ref: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), got
    assert [s for s, _ in ref] == list(range(1, STEPS + 1)), ref
    for (_, a), (_, b) in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_exactly(slurm, packs, tmp_path):
    straight, preempted, single = tmp_path / "straight", tmp_path / "preempted", tmp_path / "single"
    job = _submit_training(slurm, packs, straight)
    assert slurm.wait(job) == ["COMPLETED"], Path(f"{straight}.log").read_text()[-4000:]
    log = Path(f"{straight}.log").read_text()
    # one rank on each host, the rendezvous on the first
    assert slurm.job(job)["NodeList"] == "node[1-2]"
    assert "2 ranks on 2 node(s), rendezvous node1:" in log, log[-4000:]
    assert "hosts: node1 (rank 0), node2 (rank 1)" in log, log[-4000:]

    # Slow saves (a test-only hook) keep the run going well after the signal is sent.
    job = _submit_training(slurm, packs, preempted, **slow_saves_env(0.2))
    deadline = time.time() + 240
    while time.time() < deadline and not (preempted / "ckpt" / "step_00000002" / "meta.json").is_file():
        assert slurm.array_states(job)[0] in ("PENDING", "RUNNING"), Path(f"{preempted}.log").read_text()[-4000:]
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@180` sends before the time limit: SIGUSR1 to the batch shell
    slurm.cmd("scancel", "--batch", "--signal=USR1", job)
    # The one-process reference, outside SLURM, meanwhile: the job saves slowly, then waits seconds to be requeued.
    with open(f"{single}.log", "w") as single_log:
        reference = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config",
                                      str(REPO / "configs" / "tiny.yaml"), *_overrides(packs, single)],
                                     cwd=REPO, env={**os.environ, **_env()}, stdout=single_log, stderr=subprocess.STDOUT)
    try:
        assert slurm.wait(job) == ["COMPLETED"], Path(f"{preempted}.log").read_text()[-4000:]
        assert reference.wait(timeout=300) == 0, Path(f"{single}.log").read_text()[-4000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    log = Path(f"{preempted}.log").read_text()
    assert slurm.job(job)["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1: asking every rank to save and exit" in log
    assert "ranks exited with status 0; requeueing job" in log
    assert f"job {job} attempt 1: 2 ranks on 2 node(s)" in log, log[-4000:]
    assert log.count("hosts: node1 (rank 0), node2 (rank 1)") == 2, log[-4000:]
    saved_at = int(log.split("saving at step ")[1].split()[0])
    assert 2 <= saved_at < STEPS, log[-4000:]
    assert f"resumed from {preempted / 'ckpt' / f'step_{saved_at:08d}'}" in log
    # resumed exactly, and DP=2 across the hosts trains as one process
    _assert_same_losses(_losses(preempted), _losses(straight))
    _assert_same_losses(_losses(straight), _losses(single))


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".pack" not in p.relative_to(d).parts}


def _samples(d: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(d.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_pack_as_a_slurm_array_equals_the_same_jobs_by_hand(slurm, tmp_path):
    from conftest import genome_path, run_cli

    inputs = [str(genome_path("ecoli_contig_nmasked.fasta.gz")), str(genome_path("lambda_phage.fasta.gz"))]
    # --allow-empty-split: both records land in val with this seed; the test is about the array, not the splits
    opts = ["--seq-len", "256", "--val-fraction", "0.3", "--allow-empty-split", "--shard-size-mb", "0.02"]
    array = tmp_path / "array"
    job = slurm.sbatch("--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/pack-%A_%a.log",
                       str(REPO / "launch" / "cluster" / "slurm_pack.sbatch"), *inputs, "--out", str(array), *opts, env=_env())
    states = slurm.wait(job)
    logs = {p.name: p.read_text() for p in tmp_path.glob("pack-*.log")}
    assert states == ["COMPLETED", "COMPLETED"], logs
    for i in (0, 1):
        log = next(text for name, text in logs.items() if name.endswith(f"_{i}.log"))
        assert f"pack: job {i} of 2 from SLURM_ARRAY_TASK_ID={i} (SLURM_ARRAY_TASK_COUNT=2)" in log, log

    by_hand, single = tmp_path / "by_hand", tmp_path / "single"
    for args in ([by_hand, "--num-jobs", "2", "--job-index", "0"], [by_hand, "--num-jobs", "2", "--job-index", "1"],
                 [single]):
        rc, out, err = run_cli("pack", *inputs, *opts, "--progress", "none", "--out", *args)
        assert rc == 0, out + err

    got, want = _files(array), _files(by_hand)
    assert "manifest.json" in got
    assert sorted(got) == sorted(want)
    assert [name for name in got if got[name] != want[name]] == []
    assert json.loads(got["manifest.json"])["num_jobs"] == 2
    assert len([n for n in got if n.endswith(".tar")]) > 2
    # another number of jobs cuts other shards, but of the same samples
    assert _samples(array) == _samples(single)


@pytest.mark.parametrize("task,count,first,last,step,want", [
    ("1", "2", "0", "1", "1", (1, 2)),
    ("64", "64", "1", "64", "1", (63, 64)),  # --array=1-64
    ("4", "3", "0", "4", "2", (2, 3)),  # --array=0-4:2
    ("5", "3", "1", "9", None, None),  # --array=1,5,9: no even range
])
def test_pack_job_from_the_slurm_array_variables(monkeypatch, task, count, first, last, step, want):
    from launch.data.commands import slurm_array_job

    env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": count, "SLURM_ARRAY_TASK_MIN": first,
           "SLURM_ARRAY_TASK_MAX": last, "SLURM_ARRAY_TASK_STEP": step}
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    if want is None:
        with pytest.raises(ValueError, match="not one evenly spaced range"):
            slurm_array_job()
    else:
        assert slurm_array_job() == want
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert slurm_array_job() is None
