"""The watchdog's pieces that need no second host (tests/cluster/test_many_hosts.py runs it
across hosts: a host killed, cut off, stopped, or failing on its own)."""

import torch.distributed as dist

from launch.training.watchdog import _is_collective_error, describe_hosts


def test_hosts_are_described_with_their_ranks():
    assert describe_hosts(["node1", "node1", "node2", "node2"]) == "node1 (ranks 0-1), node2 (ranks 2-3)"
    assert describe_hosts(["a", "b", "a"]) == "a (ranks 0,2), b (rank 1)"


def test_a_collective_failure_is_told_from_a_ranks_own_error():
    assert _is_collective_error(dist.DistNetworkError("Connection reset by peer"))
    assert _is_collective_error(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not _is_collective_error(ValueError("train-00002.tar: damaged shard: sha256 ..."))
    assert not _is_collective_error(MemoryError())
