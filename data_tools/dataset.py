"""Random access to the samples of one split of a pack, through the per-shard `.idx`.

Reading sample i costs one `pread` of its `.seq` bytes: a rank reads only the samples it
is given, never a whole shard or the corpus. Indexes and file handles are opened lazily
and kept in small LRU caches, so a rank that touches few shards holds little.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .manifest import MANIFEST, load_manifest
from .shards import INDEX_DTYPE


class _LRU(OrderedDict):
    def __init__(self, size: int, on_evict=None):
        super().__init__()
        self.size, self.on_evict = size, on_evict

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            _, old = self.popitem(last=False)
            if self.on_evict:
                self.on_evict(old)
        return value


class PackedDataset:
    """The samples of `split` in a pack directory, in manifest order (shards sorted by
    name, samples in shard order). `read(i)` -> (bases as bytes, seq_type int)."""

    def __init__(self, path: str | os.PathLike, split: str = "train", max_open: int = 64):
        self.path = Path(path)
        self.split = split
        self.manifest = load_manifest(self.path)
        self.fingerprint = hashlib.sha256((self.path / MANIFEST).read_bytes() + split.encode()).hexdigest()
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.seq_len = int(self.manifest["options"]["seq_len"])
        self._index = _LRU(max_open)
        self._fds = _LRU(max_open, on_evict=os.close)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _shard_index(self, j: int) -> np.ndarray:
        def load():
            s = self.shards[j]
            p = self.path / s["index"]
            if not p.exists():
                raise FileNotFoundError(f"{p}: shard index missing (run `hyena-glt data stats {self.path} --verify`)")
            idx = np.load(p, allow_pickle=False)
            if idx.dtype != INDEX_DTYPE or len(idx) != s["samples"]:
                raise ValueError(f"{p}: index does not match the manifest ({len(idx)} entries, {s['samples']} samples)")
            return idx

        return self._index.get_or(j, load)

    def _fd(self, j: int) -> int:
        return self._fds.get_or(j, lambda: os.open(self.path / self.shards[j]["path"], os.O_RDONLY))

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)}) in {self.path} ({self.split})")
        j = int(np.searchsorted(self.ends, i, side="right"))
        return j, i - (int(self.ends[j - 1]) if j else 0)

    def read(self, i: int) -> tuple[bytes, int]:
        j, k = self.locate(i)
        offset, length, seq_type = self._shard_index(j)[k]
        data = os.pread(self._fd(j), int(length), int(offset))
        if len(data) != length:
            raise ValueError(f"{self.path / self.shards[j]['path']}: truncated (sample {k})")
        return data, int(seq_type)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
