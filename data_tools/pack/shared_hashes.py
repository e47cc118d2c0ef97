"""The sha256 of a shard that several workers write, made by the job as the parts reach the
disk (`SharedShardHashes`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..shards import ShardFile
from .file_pass import FilePlan


class SharedShardHashes:
    """The sha256 of each shard that several files, so several workers, write, made in the
    job as the files' parts reach the disk. A worker hashes what it writes, but a shard's
    sha256 runs through its bytes in order, and the bytes before a worker's part were
    written by another process. Hashing each part as soon as it and every part before it
    are on disk leaves only the last part for when the shard is completed: hashing the
    whole tar then would keep the job's end (its last shards) waiting on one process. The
    part being written is hashed as far as its worker says it is on disk (`landed`), so
    the last part too is mostly hashed by the time it is written. The job hashes a step at
    a time while no worker message waits, so that handing on plans and files never waits
    for it."""

    STEP = 1 << 20

    def __init__(self, out: Path, written: set[int]):
        self.out, self.written = out, written  # written: the job's set of files all on disk
        self.parts: dict[str, list[tuple[int, int]]] = {}  # shard -> (file position, end offset) per part, in order
        self.hashed: dict[str, tuple[object, int, int]] = {}  # shard -> (sha256, bytes hashed, parts hashed)
        self.todo: dict[str, None] = {}  # shards with written parts not hashed yet
        self.on_disk: dict[tuple[str, int], int] = {}  # (shard, file position) -> end on disk of a part being written

    def planned(self, pos: int, plan: FilePlan) -> None:
        for name, end in plan.ends.items():
            self.parts.setdefault(name, []).append((pos, end))
        self.wrote(plan.ends)

    def wrote(self, names) -> None:
        """Parts of `names` may be on disk now (shards of one file are left to its worker)."""
        for name in names:
            if len(self.parts.get(name, ())) >= 2:
                self.todo[name] = None

    def landed(self, pos: int, name: str, end: int) -> None:
        """File `pos`'s part of shard `name` is on disk up to byte `end`."""
        self.on_disk[name, pos] = end
        self.wrote([name])

    def step(self, name: str | None = None) -> None:
        """Hash up to STEP bytes of `name` (default: any shard with work), or drop it from
        the work if none of its next part is on disk."""
        name = name or next(iter(self.todo))
        parts = self.parts[name]
        sha, done, k = self.hashed.get(name) or (hashlib.sha256(), 0, 0)
        if k == len(parts):
            del self.todo[name]
            return
        pos, part_end = parts[k]
        if pos not in self.written:
            part_end = min(part_end, self.on_disk.get((name, pos), done))
            if part_end <= done:
                del self.todo[name]
                return
        end = min(part_end, done + self.STEP)
        with open(self.out / f".{name}.tar.tmp", "rb") as f:
            f.seek(done)
            chunk = f.read(end - done)
        if len(chunk) != end - done:
            raise RuntimeError(f"{name}: its temporary tar ends at byte {done + len(chunk)}, before {end}")
        sha.update(chunk)
        self.hashed[name] = (sha, end, k + (end == parts[k][1]))
        if end == parts[k][1]:
            self.on_disk.pop((name, pos), None)

    def take(self, shard: ShardFile):
        """The sha256 of all of `shard`'s members (every file in it written), or None if it
        is not a shard of several files."""
        if len(self.parts.get(shard.name, ())) < 2:
            return None
        self.todo[shard.name] = None
        while shard.name in self.todo:
            self.step(shard.name)
        sha, done, _ = self.hashed.pop(shard.name)
        if done != shard.length:
            raise RuntimeError(f"{shard.name}: hashed {done} of its {shard.length} bytes")
        return sha
