"""A real one-node SLURM cluster on localhost for the tests (tests/cluster/test_slurm.py).

Debian's slurmctld, slurmd and client commands are installed with apt-get when missing (CI
starts from a fresh machine), then both daemons start as root from a slurm.conf in a
temporary folder: 2 CPUs, free ports, auth/none (no munge daemon), no accounting, no cgroups
(proctrack/linuxproc), and short requeue and scheduling delays so that a requeued job starts
again within seconds instead of SLURM's default two minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from launch.net import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


class Unavailable(Exception):
    """SLURM cannot be installed or run on this machine (the reason is the message)."""


def ensure_installed() -> None:
    """apt-get install the SLURM packages unless their commands are already there."""
    if all(shutil.which(c) for c in COMMANDS):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        # A fresh machine may have no package lists yet.
        update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        if update.returncode != 0:
            raise Unavailable(f"apt-get update failed (no network or no Debian registry): {update.stderr.strip()[-500:]}")
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    missing = [c for c in COMMANDS if not shutil.which(c)]
    if missing:
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} is still missing")


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for d in ("state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=hyenatest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/none
CredType=cred/none
# also the delay before a requeued job may start again (SLURM's default: 120 s)
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
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
# the node's CPUs as written here, whatever the machine has
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def cmd(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def start(self, timeout: float = 60) -> None:
        self.cmd("slurmctld", "-f", str(self.conf))
        self.cmd("slurmd", "-f", str(self.conf), "-N", self.node)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is not idle after {timeout:.0f} s (state {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        # Jobs first: their processes would outlive the daemons.
        jobs = self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs:
            self.cmd("scancel", *jobs, check=False)
            deadline = time.time() + 60
            while self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        self.cmd("scontrol", "shutdown", check=False)
        deadline = time.time() + 30
        for name in ("slurmctld", "slurmd"):
            pid = self._pid(name)
            while pid and _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
