"""A pseudo-random permutation of range(n) evaluated at any position, in O(1) memory.

A Feistel network is a bijection on [0, 4**k); walking the cycle until the value falls
below n makes it a bijection on [0, n) (at most ~4 steps on average). So the shuffled
order of an epoch of a billion samples needs no array of a billion indices, and resuming
at any position needs nothing but the position.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6


def _mix(z: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer: a fast, well-mixing 64-bit hash (wraps modulo 2**64).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _keys(key: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha512(key.encode()).digest()[: 8 * _ROUNDS], dtype="<u8")


def permute(positions, n: int, key: str) -> np.ndarray:
    """perm[positions] for the permutation of range(n) named by `key`."""
    pos = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(pos.shape, dtype=np.int64)
    half = max(1, -(-(int(n - 1).bit_length()) // 2))
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _keys(key)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    out = once(pos)
    todo = out >= n
    while todo.any():
        out[todo] = once(out[todo])
        todo = out >= n
    return out.astype(np.int64)


def epoch_picks(picks, n: int, key: str) -> np.ndarray:
    """The examples of pick positions `picks` (int64 array) that walk range(n) in passes:
    pick j is example perm_e(j mod n) of pass e = j // n, each pass's permutation named by
    `key` + ":" + e. The same picks give the same examples, however they are split up."""
    out = np.empty(len(picks), dtype=np.int64)
    for epoch in np.unique(picks // n):
        sel = picks // n == epoch
        out[sel] = permute(picks[sel] % n, n, f"{key}:{int(epoch)}")
    return out
