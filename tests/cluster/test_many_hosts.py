"""torchrun across hosts, and what happens when a host is lost (tests/support/netns_cluster.py:
hosts as network namespaces with their own hostnames, joined by a switch).

* Two hosts x two ranks (TP=2 inside each host, DP=2 across) train with the per-step losses,
  gradient norms and final weights of one process; the ranks themselves report that every
  tensor-parallel group is within one host.
* A host lost four ways while a 2-host job trains (its processes SIGKILLed, its link down,
  its processes SIGSTOPped, one of its ranks raising on a damaged shard): the surviving rank
  exits within a bound far above the measured time, with one line naming the lost rank and
  host. The four jobs run at once, each on its own pair of hosts (the waits are idle time).
* Under `torchrun --max-restarts 1` a host is killed in the middle of a checkpoint save; a
  replacement host joins, the job resumes from the newest complete checkpoint, and its
  per-step losses equal one process's.
The measured times are printed (`-s`) and recorded in docs/cluster.md, not asserted tight.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import slow_saves_env
from support.netns_cluster import NetnsCluster
from support.system_packages import Unavailable
from support.training import (
    REPO,
    assert_close,
    assert_same_training,
    child_env,
    losses,
    train,
    train_argv,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PEER_TIMEOUT = 5  # train.peer_timeout_s of these runs (the default, sized for real clusters, is 60)
EXIT_BOUND = 45  # a survivor must be gone this many seconds after the fault (measured: 5-6 s)
_ports = itertools.count(29400)


@pytest.fixture(scope="module")
def cluster():
    try:
        c = NetnsCluster([f"node{i}" for i in range(1, 11)], tag="h")
    except Unavailable as e:
        pytest.skip(f"no network namespaces: {e}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def _clean_hosts(cluster):
    yield
    for h in cluster.hosts:
        h.kill()
        h.link_up()


@pytest.fixture(scope="module")
def reference(tiny_packs, tmp_path_factory):
    """The run every multi-host run here must equal: one process, 8 steps."""
    out = tmp_path_factory.mktemp("one")
    train(tiny_packs, out, 1, "train.steps=8")
    return out


def torchrun(host, rdzv: str, port: int, nnodes: int, nproc: int, out: Path, *overrides: str, packs: Path,
             extra: tuple[str, ...] = (), env: dict | None = None, wrap: tuple[str, ...] = ()) -> subprocess.Popen:
    """One node's torchrun agent of a job whose c10d rendezvous is on host `rdzv`; its output
    goes to out.NAME.log."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*wrap, sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv}:{port}", "--rdzv-id", out.name, *extra,
           "-m", "launch.cli", *train_argv(packs, out, f"train.peer_timeout_s={PEER_TIMEOUT}", *overrides)]
    with open(f"{out}.{host.name}.log", "w") as log:  # the child keeps its own descriptor
        return host.popen(cmd, cwd=REPO, env={**child_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT)


def log_of(out: Path, host) -> str:
    return Path(f"{out}.{host.name}.log").read_text(errors="replace")


def wait_for(predicate, what: str, timeout: float = 180, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"a launcher exited with {p.returncode} while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max((r["step"] for r in rows if "loss" in r), default=0)


def test_two_hosts_tp_inside_dp_across_train_as_one_process(cluster, tiny_packs, tmp_path, reference):
    node1, node2 = cluster["node1"], cluster["node2"]
    out = tmp_path / "tp2x2"
    port = next(_ports)
    procs = [torchrun(h, "node1", port, 2, 2, out, "parallel.tp=2", "train.steps=8", packs=tiny_packs)
             for h in (node1, node2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, log_of(out, node1)[-3000:] + log_of(out, node2)[-3000:]
    log = log_of(out, node1) + log_of(out, node2)
    assert any(f"hosts: {a} (ranks 0-1), {b} (ranks 2-3); every tensor-parallel group within one host" in log
               for a, b in (("node1", "node2"), ("node2", "node1"))), log[-3000:]
    assert_same_training(out, reference)


# kill_first: the host of rank 0 and of the job's store (the rendezvous endpoint)
FAULTS = ("kill", "link_down", "stop", "raise", "kill_first")


def _damaged_packs(tiny_packs: Path, root: Path) -> tuple[Path, list[tuple[Path, Path]]]:
    """A many-shard training pack, and damaged copies of its middle shards to bind-mount over
    them on one host only (its local disk, say): check_start reads the first and last shards,
    the middle ones are first read (and verified) in the training loop."""
    from conftest import genome_path, run_cli

    packs = root / "packs"
    rc, _, err = run_cli("pack", genome_path("ecoli_k12_w3110.fasta.gz"), "--out", packs / "train", "--seq-len", "128",
                         "--val-fraction", "0", "--shard-size-mb", "1", "--progress", "none")
    assert rc == 0, err
    shutil.copytree(tiny_packs / "val", packs / "val")
    shards = sorted((packs / "train").glob("*.tar"))
    assert len(shards) >= 4, shards
    damaged = []
    for shard in shards[1:-1]:
        copy = root / f"damaged-{shard.name}"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        copy.write_bytes(bytes(data))
        damaged.append((copy, shard))
    return packs, damaged


def rank0_host(hosts, out: Path):
    """The host of rank 0 (torchrun numbers the nodes in their order of arrival): the one whose
    log has the trainer's hosts line (rank 0 logs)."""
    return next((h for h in hosts if "hosts: " in log_of(out, h)), None)


def test_a_lost_host_stops_the_survivors_naming_it(cluster, tiny_packs, tmp_path):
    """One job per fault, all at once, each on two hosts of its own (1 rank per host, DP=2).
    The host lost: rank 1's (kill, link_down, stop), rank 0's, where the job's store is
    (kill_first), the one that sees the damaged shards (raise)."""
    packs, damaged = _damaged_packs(tiny_packs, tmp_path)
    jobs = {}
    for i, fault in enumerate(FAULTS):
        pair = cluster.hosts[2 * i: 2 * i + 2]
        out, port = tmp_path / fault, next(_ports)
        wrap = ()
        if fault == "raise":  # the damaged shards, seen only by the second host's processes
            binds = " && ".join(f"mount --bind {copy} {shard}" for copy, shard in damaged)
            wrap = ("sh", "-c", f'{binds} && exec "$@"', "bind")
        procs = [torchrun(pair[0], pair[0].name, port, 2, 1, out, "train.steps=100000", packs=packs),
                 torchrun(pair[1], pair[0].name, port, 2, 1, out, "train.steps=100000", packs=packs, wrap=wrap)]
        jobs[fault] = {"hosts": pair, "out": out, "procs": dict(zip(pair, procs))}
    started, ended = {}, {}
    for fault, job in jobs.items():
        if fault == "raise":  # its second host fails on its own, at its first read of a damaged shard
            job["lost"] = job["hosts"][1]
            continue
        wait_for(lambda out=job["out"]: steps_done(out) >= 2, f"step 2 of the {fault} job", procs=job["procs"].values())
        first = rank0_host(job["hosts"], job["out"])
        job["lost"] = first if fault == "kill_first" else next(h for h in job["hosts"] if h is not first)
        started[fault] = time.time()
        {"kill": job["lost"].kill, "link_down": job["lost"].link_down, "stop": job["lost"].stop,
         "kill_first": job["lost"].kill}[fault]()
    for job in jobs.values():
        job["survivor"] = next(h for h in job["hosts"] if h is not job["lost"])
    deadline = time.time() + EXIT_BOUND + 60
    while len(ended) < len(jobs) and time.time() < deadline:
        for fault, job in jobs.items():
            if fault not in started and "damaged shard" in log_of(job["out"], job["lost"]):
                started[fault] = time.time()
            if fault not in ended and job["procs"][job["survivor"]].poll() is not None:
                ended[fault] = time.time()
                started.setdefault(fault, ended[fault])
        time.sleep(0.05)
    report = {f: ended[f] - started[f] for f in ended}
    for fault, job in jobs.items():
        survivor, lost = job["survivor"], job["lost"]
        log = log_of(job["out"], survivor)
        assert fault in ended, f"{fault}: the survivor on {survivor.name} is still running:\n{log[-3000:]}"
        assert job["procs"][survivor].returncode != 0, f"{fault}: the survivor exited 0:\n{log[-3000:]}"
        lines = [x for x in log.splitlines() if f"on host {survivor.name} stops:" in x]
        assert len(lines) == 1, f"{fault}: {lines}\n{log[-3000:]}"
        want = {"raise": f"on host {lost.name} failed: ",
                "kill_first": f"host {lost.name} (rank 0) lost: the job's store there"}.get(
                    fault, f"on host {lost.name} lost: no heartbeat for")
        assert want in lines[0], f"{fault}: {lines[0]}"
        if fault == "raise":
            assert "damaged shard" in lines[0], lines[0]
    print("\nsurvivor exit after the fault (s): " + ", ".join(f"{f} {t:.1f}" for f, t in report.items()))
    for fault, took in report.items():
        assert took <= EXIT_BOUND, f"{fault}: the survivor took {took:.1f} s to exit"


def test_a_host_killed_during_a_save_is_replaced_and_the_job_resumes_exactly(cluster, tiny_packs, tmp_path, reference):
    """torchrun --max-restarts 1 on node1 and node2; node2 dies while step 4 is being saved;
    node3 starts the same command (a replacement host); the job resumes from step 2."""
    node1, node2, node3 = cluster["node1"], cluster["node2"], cluster["node3"]
    out, port = tmp_path / "restart", next(_ports)
    overrides = ("train.steps=8", "checkpoint.every=2", "checkpoint.keep=5")
    # the shared rendezvous store would hand the restarted workers stale addresses (docs/cluster.md)
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **slow_saves_env(0.3)}
    extra = ("--max-restarts", "1")
    procs = [torchrun(h, "node1", port, 2, 1, out, *overrides, packs=tiny_packs, extra=extra, env=env)
             for h in (node1, node2)]
    ckpt = out / "ckpt"
    wait_for(lambda: any(ckpt.glob("step_00000004.*.tmp")),
             "the save of step 4", procs=procs)
    assert not (ckpt / "step_00000004" / "meta.json").exists()
    node2.kill()
    killed = time.time()
    replacement = torchrun(node3, "node1", port, 2, 1, out, *overrides, packs=tiny_packs, extra=extra, env=env)
    wait_for(lambda: "on host node2 lost" in log_of(out, node1), "node1's rank to stop", procs=procs[:1])
    detected = time.time() - killed
    # what a resume reads: the newest complete checkpoint, the interrupted one only a temporary
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert procs[0].wait(timeout=300) == 0, log_of(out, node1)[-4000:]
    assert replacement.wait(timeout=120) == 0, log_of(out, node3)[-4000:]
    took = time.time() - killed
    log = log_of(out, node1) + log_of(out, node3)
    assert "on host node2 lost" in log, log[-4000:]
    assert "hosts: node1 (rank 0), node3 (rank 1)" in log or "hosts: node3 (rank 0), node1 (rank 1)" in log, log[-4000:]
    # the interrupted save's folder: removed by the failing save itself or, if it was killed first, by the resume
    assert not list(ckpt.glob("*.tmp")), sorted(p.name for p in ckpt.iterdir())
    assert f"resumed from {ckpt / 'step_00000002'} at step 2" in log, log[-4000:]
    assert (ckpt / "latest").read_text().strip() == "step_00000008"
    assert_close(losses(out), losses(reference))
    print(f"\nhost killed mid-save: node1's rank stopped after {detected:.1f} s, the job done on node1 + node3 after "
          f"{took:.1f} s")
    assert detected <= EXIT_BOUND
