"""Random access to the samples of one split of a pack, through the per-shard `.idx`.

Reading sample i costs one `pread` of its `.seq` bytes: a rank reads only the samples it
is given, never a whole shard or the corpus. Indexes and file handles are opened lazily
and kept in small LRU caches, so a rank that touches few shards holds little.

Verification (on by default): the first time a process opens a shard (or its index), the
file is hashed through the descriptor it will read from and compared with the manifest's
sha256; a damaged shard stops the reader with one line naming it and both checksums. A
file that passed is not hashed again by the same process (keyed by inode, size and mtime),
however many datasets open it. `verify=False`, or HYENA_GLT_VERIFY_SHARDS=0 in the
environment, turns it off. It only reads: the samples returned are the same either way.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .manifest import MANIFEST, load_manifest
from .shards import INDEX_DTYPE
from .tracks import FORMAT as TRACK_FORMAT


VERIFY_ENV = "HYENA_GLT_VERIFY_SHARDS"
_HASH_CHUNK = 8 << 20
_verified: set[tuple] = set()  # (path, device, inode, size, mtime_ns, sha256) of files that matched


class ShardChecksumError(ValueError):
    """A shard or index whose bytes differ from the manifest's sha256. One line."""


def verify_by_default() -> bool:
    """True unless HYENA_GLT_VERIFY_SHARDS is 0/false/no/off."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _file_key(fd: int, path: Path, expected: str) -> tuple:
    st = os.fstat(fd)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, expected)


def _mismatch(path: Path, pack: Path, expected: str, actual: str, size: int, expected_size: int | None) -> ShardChecksumError:
    sizes = f", {size} bytes where the manifest says {expected_size}" if expected_size not in (None, size) else ""
    return ShardChecksumError(
        f"{path}: damaged shard: sha256 {actual} but the manifest expects {expected}{sizes}; repack it, or list "
        f"every damaged file with `hyena-glt data stats {pack} --verify`")


def verify_fd(fd: int, path: Path, pack: Path, expected: str, expected_size: int | None = None) -> None:
    """Hash the file open at `fd` (from byte 0, whatever its position) against `expected`."""
    key = _file_key(fd, path, expected)
    if key in _verified:
        return
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    if h.hexdigest() != expected:
        raise _mismatch(path, pack, expected, h.hexdigest(), offset, expected_size)
    _verified.add(key)


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
    name, samples in shard order). `read(i)` -> (bases as bytes, seq_type int);
    `read_sample(i)` also gives the sample's conservation scores when the pack has them.

    verify: check each shard and index against the manifest's sha256 the first time it is
    opened (None: on unless HYENA_GLT_VERIFY_SHARDS=0)."""

    def __init__(self, path: str | os.PathLike, split: str = "train", max_open: int = 64, verify: bool | None = None):
        self.path = Path(path)
        self.split = split
        self.verify = verify_by_default() if verify is None else bool(verify)
        self.manifest = load_manifest(self.path)
        self.fingerprint = hashlib.sha256((self.path / MANIFEST).read_bytes() + split.encode()).hexdigest()
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.seq_len = int(self.manifest["options"]["seq_len"])
        tracks = self.manifest["options"].get("conservation")
        if tracks is not None and tracks.get("format") != TRACK_FORMAT:
            raise ValueError(f"{self.path / MANIFEST}: conservation tracks stored as {tracks.get('format')!r}, which "
                             f"this version does not read (it reads {TRACK_FORMAT})")
        self.conservation = tracks is not None
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
            data = p.read_bytes()
            if self.verify and hashlib.sha256(data).hexdigest() != s["index_sha256"]:
                raise _mismatch(p, self.path, s["index_sha256"], hashlib.sha256(data).hexdigest(), len(data), None)
            try:
                idx = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:
                raise ValueError(f"{p}: not a readable shard index ({e}); run `hyena-glt data stats {self.path} --verify`") from None
            if idx.dtype != INDEX_DTYPE or len(idx) != s["samples"]:
                raise ValueError(f"{p}: index does not match the manifest ({len(idx)} entries, {s['samples']} samples)")
            return idx

        return self._index.get_or(j, load)

    def _fd(self, j: int) -> int:
        def open_shard() -> int:
            s = self.shards[j]
            p = self.path / s["path"]
            fd = os.open(p, os.O_RDONLY)
            if self.verify:
                try:
                    verify_fd(fd, p, self.path, s["sha256"], s.get("bytes"))
                except BaseException:
                    os.close(fd)
                    raise
            return fd

        return self._fds.get_or(j, open_shard)

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)}) in {self.path} ({self.split})")
        j = int(np.searchsorted(self.ends, i, side="right"))
        return j, i - (int(self.ends[j - 1]) if j else 0)

    def read(self, i: int) -> tuple[bytes, int]:
        j, k = self.locate(i)
        offset, length, seq_type = self._shard_index(j)[k]
        return self._pread(j, k, int(offset), int(length)), int(seq_type)

    def read_sample(self, i: int) -> tuple[bytes, int, np.ndarray | None]:
        """(bases, seq_type, the bases' conservation scores as float16 with NaN where a base
        has none, or None in a pack without tracks), in one pread: the `.cons` member
        follows the `.seq` member in the tar, so the index entry of `.seq` locates both."""
        if not self.conservation:
            return (*self.read(i), None)
        j, k = self.locate(i)
        offset, length, seq_type = self._shard_index(j)[k]
        n = int(length)
        header = n + (-n % 512)  # .seq data is padded to a tar block; .cons' header comes next
        data = self._pread(j, k, int(offset), header + 512 + 2 * n)
        if not data[header : header + 100].rstrip(b"\0").endswith(b".cons"):
            raise ValueError(f"{self.path / self.shards[j]['path']}: sample {k} has no .cons member after its .seq "
                             f"member; run `hyena-glt data stats {self.path} --verify`")
        return data[:n], int(seq_type), np.frombuffer(data, "<f2", n, header + 512)

    def _pread(self, j: int, k: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(j), size, offset)
        if len(data) != size:
            raise ValueError(f"{self.path / self.shards[j]['path']}: truncated (sample {k})")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
