"""Fail fast when a peer is lost: a heartbeat per rank, and one line naming the rank and host.

A rank blocked in a collective cannot tell a slow peer from a dead one. A killed host resets
its connections and the collectives fail in seconds, but a host that drops off the network
(dead node, dead switch) or a rank that stops (a stuck device, SIGSTOP) sends nothing: the
collectives wait for their own timeout, many minutes, printing nothing. So, as torchft and
nvidia-resiliency-ext do, every rank runs a thread that

* writes a heartbeat counter to the job's TCP store (the one at MASTER_ADDR:MASTER_PORT that
  the process group met at) every `timeout / 10` seconds;
* watches one other rank, the next one in rank order (O(1) store traffic per rank, so it
  scales to thousands), and when that rank's counter has not moved for `timeout` seconds,
  writes a verdict naming it and its host to the store;
* reads the verdict key: any rank's verdict ends every rank at its next beat;
* and gives up on its own when the store itself has not answered for `timeout` seconds (the
  store's host is the one that was lost).

Ending means: one line on stderr, then `os._exit(EXIT_PEER_LOST)`. The main thread may be
blocked inside a collective that no exception can reach; the launcher (torchrun, srun) then
sees a failed rank and stops or restarts the job, which resumes from its newest checkpoint.

A rank that fails with an error of its own (a damaged shard, out of memory) writes the verdict
itself, so the others stop at their next beat instead of after the timeout. A rank that ends
normally marks itself done: its watcher no longer expects beats from it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
import uuid

EXIT_PEER_LOST = 4  # the exit status of a rank stopped because another rank or host was lost
# Sized for real clusters: far above a collective's or a GC pause's stall of the thread, far
# below the collectives' own 10-30 minutes.
DEFAULT_TIMEOUT = 60.0
PREFIX = "hyena-glt/watchdog"


def gather_hosts() -> list[str]:
    """Every rank's host name, indexed by rank (collective)."""
    import torch.distributed as dist

    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def describe_hosts(hosts: list[str]) -> str:
    """'node1 (ranks 0-1), node2 (ranks 2-3)'."""
    ranks: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        ranks.setdefault(h, []).append(r)
    return ", ".join(f"{h} ({_span(rs)})" for h, rs in ranks.items())


def _span(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def _is_collective_error(error: BaseException) -> bool:
    """An error raised because a peer is gone (its connection reset or timed out), not one of
    this rank's own: the watchdog, not this rank, knows who was lost."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(w in text for w in ("gloo", "nccl", "connection reset", "connection closed", "broken pipe"))


class PeerWatchdog:
    """Started collectively by `start` once the process groups exist; `close` when training
    ends (normally or with this rank's own error)."""

    def __init__(self, rank: int, hosts: list[str], timeout: float, store_addr: str, store_port: int, token: str):
        import torch.distributed as dist

        self.rank, self.hosts, self.world = rank, hosts, len(hosts)
        self.timeout = timeout
        self.interval = min(max(timeout / 10, 0.2), 10.0)
        self.store_addr, self.store_port = store_addr, store_port
        self.key = f"{PREFIX}/{token}"
        self.watched = (rank + 1) % self.world
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        # Its own client: a store operation blocks this thread for at most `interval`, never
        # the trainer's, and a dead store host cannot hang it.
        self.store = dist.TCPStore(store_addr, store_port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(2 * self.interval, 1.0)))
        self._thread = threading.Thread(target=self._run, name="hyena-glt-watchdog", daemon=True)

    @classmethod
    def start(cls, timeout: float, hosts: list[str]) -> PeerWatchdog | None:
        """Collective. None for one process, timeout 0, or a launch without MASTER_ADDR/PORT."""
        import torch.distributed as dist

        world = dist.get_world_size()
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world == 1 or timeout <= 0 or not addr or not port:
            return None
        token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)  # a key space per attempt: a restart sees no old verdict
        dog = cls(dist.get_rank(), hosts, timeout, addr, int(port), token[0])
        dog._thread.start()
        return dog

    def where(self, rank: int) -> str:
        return f"rank {rank} on host {self.hosts[rank]}"

    def _store_host(self) -> str:
        """The host of the store, with its ranks when MASTER_ADDR is one of the ranks' host names."""
        ranks = [r for r, h in enumerate(self.hosts) if h.split(".")[0] == self.store_addr.split(".")[0]]
        return f"host {self.store_addr} ({_span(ranks)})" if ranks else f"host {self.store_addr}"

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        from launch.checkpoint.io import oneline

        last_ok = last_change = time.monotonic()
        beat, seen, watching = 0, None, True
        hb = f"{self.key}/beat/"
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                beat += 1
                self.store.set(f"{hb}{self.rank}", str(beat))
                if self.store.check([f"{self.key}/verdict"]):
                    self._end(self.store.get(f"{self.key}/verdict").decode(), told=True)
                if watching and self.store.check([f"{self.key}/done/{self.watched}"]):
                    watching = False
                elif watching and self.store.check([f"{hb}{self.watched}"]):
                    value = self.store.get(f"{hb}{self.watched}")
                    if value != seen:
                        seen, last_change = value, now
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the store's host may be the one lost
                if self._stop.is_set():
                    return
                if now - last_ok > self.timeout:
                    self._end(f"{self._store_host()} lost: the job's store there ({self.store_addr}:{self.store_port}) "
                              f"has not answered for {now - last_ok:.0f} s ({oneline(e)[:200]})")
                continue
            if watching and now - last_change > self.timeout:
                what = "no heartbeat since it started" if seen is None else "no heartbeat"
                verdict = (f"{self.where(self.watched)} lost: {what} for {now - last_change:.0f} s (killed, hung, or "
                           f"cut off from the network; seen by {self.where(self.rank)})")
                self._tell(verdict)
                self._end(verdict)

    def _tell(self, verdict: str) -> None:
        try:
            # the first verdict stands: the others read it, not their own
            self.store.compare_set(f"{self.key}/verdict", "", verdict)
        except Exception:  # noqa: BLE001 - the others then find out by their own watch
            pass

    def _end(self, reason: str, told: bool = False) -> None:
        if self._stop.is_set() or not self._exiting.acquire(blocking=False):
            return
        print(f"hyena-glt train: {self.where(self.rank)} stops: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)

    # ------------------------------------------------------------------ the trainer's side
    def close(self, done: bool = True) -> None:
        """Stop watching. `done`: this rank ended normally; its watcher expects no more beats."""
        if self._stop.is_set():
            return
        if done:
            try:
                self.store.set(f"{self.key}/done/{self.rank}", "1")
            except Exception:  # noqa: BLE001
                pass
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 5)

    def failed(self, error: BaseException) -> None:
        """This rank's training raised `error`. A collective that failed because a peer is gone:
        wait (up to the timeout) for the thread to name the lost peer and end the process. An
        error of this rank's own: write it as the verdict so every other rank stops now."""
        if self._stop.is_set():
            return
        if _is_collective_error(error):
            deadline = time.monotonic() + self.timeout + 3 * self.interval
            while time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(self.interval / 2)
            self.close(done=False)
            return
        from launch.checkpoint.io import oneline

        self._stop.set()  # before the verdict: this rank's own thread must not end it first
        self._thread.join(timeout=2 * self.interval + 5)
        self._tell(f"{self.where(self.rank)} failed: {oneline(error)[:500]}")
