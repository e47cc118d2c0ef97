"""A real two-node SLURM cluster on one machine for the tests (tests/cluster/test_slurm.py):
each node a host of a NetnsCluster (tests/support/netns_cluster.py), node1 198.18.0.1 and
node2 198.18.0.2, so that a job's ranks on different nodes talk over a network, by name.

Debian's slurmctld, slurmd and client commands are installed with apt-get when missing (CI
starts from a fresh machine). slurmctld runs on node1 and one slurmd on each node, every daemon
as root inside its host's namespace, from a slurm.conf in a temporary folder (a filesystem that
every node shares, as on a cluster): 1 CPU per node, auth/none (no munge daemon), no
accounting, no cgroups (proctrack/linuxproc), and short requeue and scheduling delays so that
a requeued job starts again within seconds instead of SLURM's default two minutes. The client
commands run on node1 too: the node names resolve only inside the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from .netns_cluster import NetnsCluster
from .system_packages import Unavailable, ensure_installed

__all__ = ["LocalSlurm", "Unavailable"]

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


class LocalSlurm:
    """`LocalSlurm(root)`: the cluster's files under `root`; `start()`, then `stop()` (which also
    removes the namespaces). Raises Unavailable when SLURM cannot be installed or namespaces
    cannot be made here."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("node1", "node2"), cpus: int = 1):
        ensure_installed(PACKAGES, COMMANDS)
        self.root = root
        self.net = NetnsCluster(list(nodes), tag="s")  # beside any other cluster of this process
        try:
            self._configure(cpus)
        except BaseException:
            self.net.close()
            raise

    def _configure(self, cpus: int) -> None:
        root = self.root
        self.head = self.net.hosts[0]
        self.nodes = [h.name for h in self.net.hosts]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: dict[str, subprocess.Popen] = {}
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (root / d).mkdir(parents=True, exist_ok=True)
        # `ip netns exec` mounts a sysfs of the namespace over /sys, without /sys/fs/cgroup:
        # slurmd's cgroup plugin must not look for a cgroup version there (autodetect fails).
        # proctrack/linuxproc and task/none make no cgroups.
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        node_lines = "".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs={cpus} State=UNKNOWN\n" for h in self.net.hosts)
        # SLURM's own ports: every host is a namespace of its own, nothing else listens there.
        self.conf.write_text(f"""\
ClusterName=hyenatest
SlurmctldHost={self.head.name}({self.head.addr})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/none
CredType=cred/none
# also the delay before a requeued job may start again (SLURM's default: 120 s)
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
# one slurmd per node on a shared filesystem: %n is the node's name
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# the nodes' CPUs as written here, whatever the machine has
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
{node_lines}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def cmd(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) run on the head node."""
        proc = self.head.run(list(args), env=kw.pop("env", self.env), timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def _daemon(self, name: str, host, *args: str) -> None:
        # In the foreground (-D): the NetnsCluster holds the process and kills it when closed. Its
        # stderr repeats its log file, but also holds what went wrong before the log was opened.
        with open(self.root / "log" / f"{name}.stderr", "w") as err:
            self.daemons[name] = host.popen([name.split("@")[0], "-D", "-f", str(self.conf), *args], env=self.env,
                                            stdout=subprocess.DEVNULL, stderr=err)

    def start(self, timeout: float = 60) -> None:
        self._daemon("slurmctld", self.head)
        for h in self.net.hosts:
            self._daemon(f"slurmd@{h.name}", h, "-N", h.name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead:
                err = "".join((self.root / "log" / f"{n}.stderr").read_text(errors="replace")[-2000:] for n in dead)
                raise RuntimeError(f"SLURM daemon(s) {', '.join(dead)} exited at start:\n{err}\n{self.logs()}")
            states = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            if sorted(states[1::2]) == ["idle"] * len(self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM nodes are not idle after {timeout:.0f} s ({states!r}):\n{self.logs()}")

    def stop(self) -> None:
        # (a controller that is gone, after a failed start, answers with a timeout: killed below all the same)
        try:
            # Jobs first: their processes would outlive the daemons.
            jobs = self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                deadline = time.time() + 60
                while self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.strip() and time.time() < deadline:
                    time.sleep(0.5)
            self.cmd("scontrol", "shutdown", check=False)
            deadline = time.time() + 30
            for p in self.daemons.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            # whatever is left (a daemon that did not stop, a job step) is SIGKILLed with its host
            self.net.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted((self.root / "log").glob("*.log")))

    # ------------------------------------------------------------ jobs
    def sbatch(self, *args: str, env: dict | None = None) -> str:
        return self.cmd("sbatch", "--parsable", *args, env={**self.env, **(env or {})}).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as key -> value (for an array: its first task)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout.splitlines()[0]
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def array_states(self, job_id: str) -> list[str]:
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)["JobState"]
                for line in self.cmd("scontrol", "show", "job", "-o", job_id).stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 300) -> list[str]:
        """Wait until every task of the job has ended (a requeued job is pending, not ended)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.array_states(job_id)
            if states and all(s in DONE_STATES for s in states):
                return states
            time.sleep(0.5)
        self.cmd("scancel", job_id, check=False)
        raise TimeoutError(f"SLURM job {job_id} still running after {timeout:.0f} s:\n{self.logs()}")
