"""sshd on every host of a NetnsCluster, so that `ssh node2 CMD` works from inside any host
with no prompt, as on a cluster whose nodes trust each other (pdsh, mpiexec's ssh launcher).

* One client key pair and one host key, made by ssh-keygen in a temp dir of their own (0700);
  root's home (~/.ssh) and the machine's /etc/ssh are not touched.
* Each host gets /etc/netns/NS/ssh/{ssh_config,sshd_config}. `ip netns exec` bind-mounts every
  entry of /etc/netns/NS/ over /etc/ (directories too), so inside a host /etc/ssh is that
  directory: its ssh finds the key and trusts any host key, its sshd takes that config.
  Those files exist before the host's first process (sshd) starts: a process sees the
  /etc/netns entries that were there when it was started.
* sshd is started with `host.popen`, so it and every session it opens run in the host's
  namespace with the host's hostname. It listens on port 22 of the host (lo and eth0 only:
  nothing else is in the namespace), root logs in by key only (PermitRootLogin
  prohibit-password), no PAM, no DNS lookups.
* sshd needs its privilege-separation directory /run/sshd (a compiled-in path): made if
  missing, and removed again by the one that made it.

    with NetnsCluster(["node1", "node2"]) as cluster, ssh_hosts(cluster):
        cluster["node1"].run(["ssh", "node2", "hostname"])  # -> node2
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .netns_cluster import NETNS_ETC, NetnsCluster
from .system_packages import ensure_installed

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be started by its absolute path
PRIVSEP_DIR = Path("/run/sshd")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hyena-glt-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def ssh_config(keys: Path) -> str:
    return (f"Host *\n"
            f"    User root\n"
            f"    IdentityFile {keys / 'id_ed25519'}\n"
            f"    IdentitiesOnly yes\n"
            f"    StrictHostKeyChecking no\n"
            f"    UserKnownHostsFile /dev/null\n"
            f"    GlobalKnownHostsFile /dev/null\n"
            f"    LogLevel ERROR\n"
            f"    BatchMode yes\n"
            f"    ConnectTimeout 10\n"
            f"    ForwardAgent no\n"
            f"    ForwardX11 no\n")


def sshd_config(keys: Path) -> str:
    return (f"Port 22\n"
            f"HostKey {keys / 'ssh_host_ed25519_key'}\n"
            f"PidFile none\n"
            f"PermitRootLogin prohibit-password\n"
            f"PubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
            # the keys live under /tmp (world-writable), which StrictModes refuses for authorized_keys
            f"StrictModes no\n"
            f"PasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\n"
            f"UsePAM no\n"
            f"UseDNS no\n"
            f"X11Forwarding no\n"
            f"PrintMotd no\n"
            f"PrintLastLog no\n"
            # pdsh and hydra open one connection per host at once; several launches may overlap
            f"MaxStartups 100\n"
            f"MaxSessions 100\n"
            f"LogLevel ERROR\n")


class SshHosts:
    def __init__(self, cluster: NetnsCluster, keys: Path):
        self.cluster, self.keys = cluster, keys
        self.sshd: dict[str, subprocess.Popen] = {}

    def wait_ready(self, timeout: float = 20) -> None:
        """Until every host answers `ssh HOST hostname` with its own name, from every host."""
        deadline = time.time() + timeout
        for src in self.cluster.hosts:
            for dst in self.cluster.hosts:
                while True:
                    r = src.run(["ssh", dst.name, "hostname"], timeout=15)
                    if r.returncode == 0 and r.stdout.strip() == dst.name:
                        break
                    dead = [n for n, p in self.sshd.items() if p.poll() is not None]
                    if dead or time.time() > deadline:
                        raise RuntimeError(f"ssh {src.name} -> {dst.name}: exit {r.returncode}: {r.stdout}{r.stderr}"
                                           f"{self.logs()}")
                    time.sleep(0.1)

    def logs(self) -> str:
        return "".join(f"\nsshd on {p.stem}: {p.read_text()[-2000:]}" for p in sorted(self.keys.glob("*.log")))


@contextlib.contextmanager
def ssh_hosts(cluster: NetnsCluster) -> Iterator[SshHosts]:
    """sshd on every host of `cluster`; on exit the sshd processes, /etc/netns/NS/ssh, the keys
    and /run/sshd (where made here) are removed. Raises Unavailable where openssh cannot be
    installed."""
    ensure_installed(("openssh-server", "openssh-client"), ("sshd", "ssh", "ssh-keygen"))
    keys = Path(tempfile.mkdtemp(prefix="hgt-ssh-"))  # 0700
    made_privsep = False
    hosts = SshHosts(cluster, keys)
    etc_dirs = [NETNS_ETC / h.ns / "ssh" for h in cluster.hosts]
    try:
        _keygen(keys / "id_ed25519")
        _keygen(keys / "ssh_host_ed25519_key")
        shutil.copyfile(keys / "id_ed25519.pub", keys / "authorized_keys")
        os.chmod(keys / "authorized_keys", 0o600)
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            made_privsep = True
        for h, etc in zip(cluster.hosts, etc_dirs):
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "ssh_config").write_text(ssh_config(keys))
            (etc / "sshd_config").write_text(sshd_config(keys))
            with open(keys / f"{h.name}.log", "wb") as log:
                hosts.sshd[h.name] = h.popen([SSHD, "-D", "-e"], stdout=log, stderr=subprocess.STDOUT)
        hosts.wait_ready()
        yield hosts
    finally:
        for p in hosts.sshd.values():  # the listeners; sessions left running die with the cluster
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(keys, ignore_errors=True)
        if made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
