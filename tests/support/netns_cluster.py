"""A small cluster on one machine: each host a Linux network namespace with a hostname of its
own, all joined by a switch, for tests of what crosses a host boundary.

* The switch is a bridge inside a namespace of its own; each host has one veth pair, `eth0` in
  the host, its peer a port of the bridge. Nothing is made in the machine's own namespace, so
  no traffic leaves the namespaces made here.
* Addresses come from 198.18.0.0/15 (reserved for network tests): host i is 198.18.0.i/24.
* Names: `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts, so every host resolves
  every other by name (its own name to its eth0 address, not loopback: a rendezvous must
  advertise an address the other hosts can reach).
* Every process of a host runs inside its namespace and under `unshare --uts`, with the host's
  name as its hostname (torchrun, SLURM and MPI tell hosts apart by it).
* A dead host two ways: `kill_host` SIGKILLs every process in its namespace (the kernel resets
  their connections), `link_down` takes its switch port down (a dead node or switch: silence,
  no reset); `stop_host` SIGSTOPs its processes (a hung node).

The cluster removes what it made (processes, namespaces, /etc/netns entries) when closed,
and namespaces that an earlier test process left behind (crashed) when created.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .system_packages import Unavailable, ensure_installed

PREFIX = "hgt"  # every namespace this module makes: hgt<pid>-<host>
NETNS_ETC = Path("/etc/netns")
SUBNET = "198.18.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _namespace_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces of this module whose test process is gone (it crashed before closing them)."""
    proc = _ip("netns", "list", check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        owner = "".join(itertools.takewhile(str.isdigit, name[len(PREFIX):]))
        if owner and not _pid_alive(int(owner)):
            _remove_namespace(name)


def _remove_namespace(ns: str) -> None:
    for pid in _namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


class Host:
    def __init__(self, cluster: NetnsCluster, index: int, name: str):
        self.cluster, self.index, self.name = cluster, index, name
        self.ns = f"{cluster.tag}-{name}"
        self.addr = f"{SUBNET}.{index}"
        self.port = f"{cluster.tag[len(PREFIX):]}p{index}"[-15:]  # its switch port (ifname <= 15 chars)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as a process of this host: in its namespace, with its hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *map(str, argv)]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        # a session of its own: the test can signal the whole launch (agent and workers) at once
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv), **kw)
        self.cluster.processes.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def pids(self) -> list[int]:
        return _namespace_pids(self.ns)

    def signal_all(self, sig: int) -> list[int]:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill(self) -> None:
        """Every process of the host SIGKILLed (a host that dies with its kernel still answering)."""
        self.signal_all(signal.SIGKILL)

    def link_down(self) -> None:
        """The host's switch port down: it drops off the network without a word."""
        _ip("-n", self.cluster.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.cluster.switch, "link", "set", self.port, "up")

    def stop(self) -> None:
        """Every process of the host SIGSTOPped: alive, connections open, doing nothing."""
        self.signal_all(signal.SIGSTOP)

    def __repr__(self) -> str:
        return f"Host({self.name} {self.addr} in {self.ns})"


class NetnsCluster:
    """`NetnsCluster(["node1", "node2"])`: hosts named in order, 198.18.0.1, .2, ...

    Raises Unavailable when namespaces cannot be made here (not root, no CAP_SYS_ADMIN)."""

    def __init__(self, names: list[str] | tuple[str, ...] = ("node1", "node2"), tag: str = ""):
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        ensure_installed(("iproute2", "util-linux"), ("ip", "unshare"))
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}{tag}"  # `tag`: several clusters in one test process
        self.switch = f"{self.tag}-switch"
        self.hosts = [Host(self, i + 1, n) for i, n in enumerate(names)]
        self.processes: list[subprocess.Popen] = []
        try:
            self._make()
        except Exception as e:
            self.close()
            if isinstance(e, RuntimeError) and "Operation not permitted" in str(e):
                raise Unavailable(f"cannot make network namespaces here: {e}") from e
            raise

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")
            # made inside the host, its peer moved to the switch: nothing in the machine's namespace
            _ip("-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", h.port, "netns", self.switch)
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", h.port, "master", "br0")
            _ip("-n", self.switch, "link", "set", h.port, "up")
            etc = NETNS_ETC / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
        self._wait_reachable()

    def _wait_reachable(self, timeout: float = 10) -> None:
        """Until the first host reaches every other (the bridge forwards once its ports are up)."""
        deadline = time.time() + timeout
        first, *rest = self.hosts
        for h in rest:
            while True:
                r = first.run(["ping", "-c", "1", "-W", "1", h.name], timeout=5) if shutil.which("ping") else None
                if r is None or r.returncode == 0:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"{first.name} cannot reach {h.name}: {r.stdout}{r.stderr}")
                time.sleep(0.2)

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def close(self) -> None:
        for h in self.hosts:
            h.kill()
        for p in self.processes:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=10)
        for h in self.hosts:
            _remove_namespace(h.ns)
        _remove_namespace(self.switch)

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
