"""The two multi-host launchers a user starts by hand, across two hosts that trust each other
over ssh (tests/support/netns_cluster.py: hosts as network namespaces with hostnames of their
own; tests/support/ssh_hosts.py: sshd on each, passwordless root ssh between them).

* The DeepSpeed launcher with pdsh (`deepspeed --hostfile --launcher pdsh`, started on node1
  as a user would, one rank per host, ZeRO-2 over DP=2): the per-step losses, gradient norms
  and final weights of one process. The ranks reach each other only through the hosts' own
  environment and the launcher's `.deepspeed_env` (in the directory it is started from).
* `mpiexec -launcher ssh -hosts node1,node2` (MPICH's hydra) running `hyena-glt pack`, one
  rank per host: the same bytes as the same pack by two ranks on one host.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, genome_path
from support.data import read_fasta, tree_bytes, write_fasta
from support.netns_cluster import NetnsCluster
from support.ssh_hosts import ssh_hosts
from support.system_packages import Unavailable, ensure_installed
from support.training import REPO, assert_same_training, child_env, train, train_argv

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
# --allow-empty-split: which split each of the 3 records lands in is the seed's (all in val, as it
# happens); this test is about the bytes across hosts, not the splits
PACK_OPTIONS = ["--seq-len", "2048", "--stride", "1500", "--reverse-complement", "both", "--shard-size-mb", "0.2",
                "--val-fraction", "0.3", "--allow-empty-split", "--progress", "none"]


@pytest.fixture(scope="module")
def cluster():
    try:
        c = NetnsCluster(["node1", "node2"], tag="l")
    except Unavailable as e:
        pytest.skip(f"no network namespaces: {e}")
    try:
        with ssh_hosts(c):
            yield c
    except Unavailable as e:
        pytest.skip(f"no sshd: {e}")
    finally:
        c.close()


def test_deepspeed_pdsh_launcher_across_two_hosts_trains_as_one_process(cluster, tiny_packs, tmp_path):
    try:
        ensure_installed(("pdsh",), ("pdsh",))
    except Unavailable as e:
        pytest.skip(f"no pdsh: {e}")
    # The launcher's directory: its hostfile and .deepspeed_env (the runner reads ./.deepspeed_env
    # and ~/.deepspeed_env; root's home is not ours to write). pdsh starts each host's ranks in
    # a fresh ssh session: they get only what is exported (PYTHON* variables and that file).
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    (launch_dir / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    (launch_dir / ".deepspeed_env").write_text(
        f"OMP_NUM_THREADS=1\nTORCH_EXTENSIONS_DIR={tmp_path / 'torch_extensions'}\nDS_ACCELERATOR=cpu\n")
    out = tmp_path / "ds"
    cmd = [BIN / "deepspeed", "--hostfile", launch_dir / "hostfile", "--launcher", "pdsh", "--master_addr", "node1",
           "--master_port", str(free_port()), "--module", "launch.cli", *train_argv(tiny_packs, out, "zero.stage=2")]
    # The reference, one process (plain AdamW, no ZeRO), trains meanwhile: much of the launch's
    # time is ssh and start-up.
    reference = tmp_path / "one"
    one = train(tiny_packs, reference, 1, launcher="python", wait=False)
    try:
        proc = cluster["node1"].run(cmd, cwd=launch_dir, env=child_env(), timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{log[-5000:]}"
        # pdsh prefixes each host's lines with its name; rank 0 reports where every rank runs
        # (each rank's socket.gethostname(), gathered).
        assert "node1: hosts: node1 (rank 0), node2 (rank 1)" in log, log[-5000:]
        one_log, _ = one.communicate(timeout=300)
        assert one.returncode == 0, one_log[-5000:]
    finally:
        if one.poll() is None:
            one.kill()
            one.communicate()
    assert_same_training(out, reference)


def _node_processes(host, needle: str) -> list[str]:
    found = []
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in argv if a)
        if needle in line:
            found.append(line)
    return found


def _eth0_bytes(host) -> int:
    """Bytes sent plus received on the host's eth0 (its only link to the other hosts)."""
    stats = Path("/sys/class/net/eth0/statistics")
    r = host.run(["cat", stats / "rx_bytes", stats / "tx_bytes"])
    assert r.returncode == 0, r.stderr
    return sum(int(x) for x in r.stdout.split())


def test_mpiexec_ssh_launcher_across_two_hosts_packs_the_same_bytes(cluster, tmp_path):
    ecoli = genome_path("ecoli_k12_w3110.fasta.gz")
    name, seq = read_fasta(ecoli)[0]
    part = write_fasta(tmp_path / "ecoli_part.fa.gz", [(name, seq[:400_000])], gz=True)
    inputs = [genome_path("lambda_phage.fasta.gz"), genome_path("ecoli_contig_nmasked.fasta.gz"), part]
    node1, node2 = cluster["node1"], cluster["node2"]
    # -ppn 1: rank 0 on node1 (hydra's own host: forked), rank 1 on node2 (a proxy started
    # by ssh); -iface eth0: hydra's control connections on the hosts' link.
    hydra = [BIN / "mpiexec", "-launcher", "ssh", "-hosts", "node1,node2", "-ppn", "1", "-n", "2", "-iface", "eth0",
             "-prepend-pattern", "[%r@%h] "]
    # MPICH's UCX sees both namespaces as one node (one kernel, one boot id) and would move the
    # ranks' messages through shared memory and CMA (measured: UCX_PROTO_INFO=y said "intra-node",
    # sysv/cma); on two real hosts it takes the network. TCP on eth0, as between real hosts.
    env = {**child_env(), "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}

    # Where the ranks run, from the ranks themselves, and MPI between them over eth0: 4 MiB
    # sent from rank 0 to rank 1 must cross node2's eth0 (a namespace has no other link out).
    probe = ("import os, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; a = bytearray(1 << 22); "
             "c.Send([a, MPI.BYTE], dest=1) if c.rank == 0 else c.Recv([a, MPI.BYTE], source=0); "
             "os.write(1, f'{c.rank} {c.allgather(socket.gethostname())}\\n'.encode())")
    before = _eth0_bytes(node2)
    r = node1.run([*hydra, sys.executable, "-c", probe], cwd=REPO, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0@node1] 0 ['node1', 'node2']", "[1@node2] 1 ['node1', 'node2']"], \
        r.stdout + r.stderr
    assert _eth0_bytes(node2) - before > 1 << 22

    multi = tmp_path / "multi"
    proc = node1.popen([*hydra, BIN / "hyena-glt", "pack", *inputs, "--out", multi, *PACK_OPTIONS], cwd=REPO,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The pack process on node2: started there by hydra's proxy over ssh.
    seen_on_node2 = []
    while proc.poll() is None and not seen_on_node2:
        seen_on_node2 = _node_processes(node2, "hyena-glt pack")
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout + stderr
    assert seen_on_node2, "no `hyena-glt pack` process was seen in node2's namespace"
    assert "[0@node1] pack job 0/2: merged the job manifests of the 2 MPI ranks, gathered over MPI" in stderr, stderr
    assert "[1@node2] pack job 1/2: job manifest gathered over MPI to rank 0" in stderr, stderr

    # The same pack, both ranks on one host (the machine's own, hydra's default launcher).
    one = tmp_path / "one"
    r = subprocess.run([BIN / "mpiexec", "-n", "2", BIN / "hyena-glt", "pack", *inputs, "--out", one, *PACK_OPTIONS],
                       check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    a, b = tree_bytes(multi), tree_bytes(one)
    assert len([k for k in a if k.endswith(".tar")]) > 5
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
