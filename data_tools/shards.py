"""Shard work units and the one function that writes a shard.

The main process decides what goes into every shard (`ShardCutter`); writing a shard
(reverse complements, JSON, tar, sha256, index) is a pure function of its `ShardTask`, so
it can run in any worker process and the bytes do not depend on --workers.

Each `.tar` gets a sidecar `.idx` (a numpy array: data offset, length and seq type of
every sample's `.seq` member) so loaders can `pread` one sample without scanning tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyena_glt.tokenizer import SeqType, reverse_complement

from .windows import SEQ_TYPE_NAMES

INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("seq_type", "u1")])
_BLOCK, _RECORD = 512, 512 * 20  # tar block; tarfile pads the archive to 20 blocks


def shard_name(split: str, job: int, shard: int) -> str:
    return f"{split}-{job:05d}-{shard:06d}"


def sample_key(file_index: int, record_index: int, start: int, strand: str) -> str:
    # No dots: webdataset takes everything before the first dot as the key.
    return f"{file_index:05d}-{record_index:09d}-{start:012d}-{'f' if strand == '+' else 'r'}"


@dataclass
class Segment:
    """Kept windows of one record that go to one shard, with the bases they span."""

    file_index: int
    record_index: int
    record_id: str
    source: str
    seq_type: int
    offset: int  # record coordinate of seq[0]
    windows: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the record
    strands: tuple[str, ...] = ("+",)
    seq: bytes = b""


@dataclass
class ShardTask:
    name: str
    split: str
    segments: list[Segment] = field(default_factory=list)
    samples: int = 0
    bases: int = 0
    inputs: dict[str, str] = field(default_factory=dict)  # source path -> sha256


class ShardCutter:
    """Fills the shards of one split in source order and cuts a new shard before the
    payload (bases over both strands) would pass `limit_bases`. The cut depends only on the
    kept windows, never on how many workers write the shards."""

    def __init__(self, split: str, job: int, limit_bases: int):
        self.split, self.job, self.limit = split, job, max(1, limit_bases)
        self.count = 0
        self.task = ShardTask(shard_name(split, job, 0), split)
        self.segment: Segment | None = None
        self.ready: list[ShardTask] = []

    def add(self, seg_template: Segment, start: int, end: int, record_seq: bytes) -> None:
        nbases = (end - start) * len(seg_template.strands)
        if self.task.samples and self.task.bases + nbases > self.limit:
            self.end_record(record_seq)
            self.ready.append(self.task)
            self.count += 1
            self.task = ShardTask(shard_name(self.split, self.job, self.count), self.split)
        seg = self.segment
        if seg is None:  # the first window of this record in this shard
            seg = self.segment = Segment(**{**seg_template.__dict__, "windows": []})
            self.task.segments.append(seg)
            self.task.inputs[seg.source] = ""  # its sha256, filled in once the file passed its check
        seg.windows.append((start, end))
        self.task.samples += len(seg.strands)
        self.task.bases += nbases

    def end_record(self, record_seq: bytes) -> None:
        """Copy out the bases the open segment needs, so the record can be freed. Called
        after every record (and before a cut inside one)."""
        seg = self.segment
        if seg is not None:
            seg.offset = seg.windows[0][0]
            seg.seq = record_seq[seg.offset : seg.windows[-1][1]]
        self.segment = None

    def finish(self) -> list[ShardTask]:
        if self.task.samples:
            self.ready.append(self.task)
        return self.take_ready()

    def take_ready(self) -> list[ShardTask]:
        out, self.ready = self.ready, []
        return out


class _HashingFile(io.RawIOBase):
    def __init__(self, f):
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.count += len(b)
        return self.f.write(b)


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary name and rename, so a reader (or a resumed run) sees the whole
    file or none of it. The temporary name is per process: two jobs may race to write the
    same (identical) manifest. `durable` also fsyncs (for manifests; shards need not, see
    `completed`)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shard(task: ShardTask, out_dir: str, done_dir: str) -> dict:
    """Write `task` as `<name>.tar` + `<name>.idx` in out_dir (temporary names, then
    rename) and then its completion record in done_dir. Returns the shard's manifest entry.
    An OSError without a file name (a write to a full disk) is raised again naming the shard."""
    try:
        return _write_shard(task, out_dir, done_dir)
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(Path(out_dir) / f"{task.name}.tar")) from e
        raise


def _write_shard(task: ShardTask, out_dir: str, done_dir: str) -> dict:
    from webdataset import TarWriter

    out, done = Path(out_dir), Path(done_dir)
    tar_path, idx_path = out / f"{task.name}.tar", out / f"{task.name}.idx"
    tmp_tar = out / f".{task.name}.tar.{os.getpid()}.tmp"
    index = np.zeros(task.samples, dtype=INDEX_DTYPE)
    pos, i = 0, 0
    with open(tmp_tar, "wb") as f:
        hf = _HashingFile(f)
        # Fixed mtime, user and mode: the same task gives the same bytes on any run.
        with TarWriter(hf, encoder=False, mtime=0, user="hyena-glt", group="hyena-glt", mode=0o444) as tw:
            # TarWriter documents USTAR as its default format but does not pass it on to
            # tarfile, which then checks every member for PAX headers: twice as slow.
            tw.tarstream.format = tarfile.USTAR_FORMAT
            for seg in task.segments:
                stype = SeqType(seg.seq_type)
                head = json.dumps({"record_id": seg.record_id, "source": seg.source})[:-1]
                for start, end in seg.windows:
                    fwd = seg.seq[start - seg.offset : end - seg.offset]
                    for strand in seg.strands:
                        seq = fwd if strand == "+" else reverse_complement(fwd, rna=stype == SeqType.RNA)
                        meta = (
                            f'{head}, "start": {start}, "end": {end}, "strand": "{strand}", '
                            f'"split": "{task.split}", "seq_type": "{SEQ_TYPE_NAMES[stype]}"}}'
                        ).encode()
                        key = sample_key(seg.file_index, seg.record_index, start, strand)
                        tw.write({"__key__": key, "json": meta, "seq": seq})
                        # Members go in sorted order (.json, .seq), each a 512-byte header
                        # plus data padded to 512 bytes.
                        pos += _BLOCK + _padded(len(meta))
                        index[i] = (pos + _BLOCK, len(seq), int(stype))
                        pos += _BLOCK + _padded(len(seq))
                        i += 1
    expected = -(-(pos + 2 * _BLOCK) // _RECORD) * _RECORD
    if hf.count != expected or i != task.samples:
        raise RuntimeError(f"{task.name}: tar layout is not the expected one ({hf.count} != {expected} bytes)")
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    atomic_write(idx_path, buf.getvalue(), durable=False)
    os.replace(tmp_tar, tar_path)
    entry = {
        "path": tar_path.name,
        "split": task.split,
        "samples": task.samples,
        "bases": task.bases,
        "bytes": hf.count,
        "sha256": hf.sha.hexdigest(),
        "index": idx_path.name,
        "index_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
    }
    record = json.dumps({"shard": entry, "inputs": task.inputs}, sort_keys=True).encode()
    atomic_write(done / f"{task.name}.json", record, durable=False)
    return entry


def completed(task: ShardTask, out_dir: Path, done_dir: Path) -> dict | None:
    """The manifest entry of a shard a previous run finished for this same task, or None.
    A record only counts if the task's inputs have the same sha256 as then and both files
    still hash to the recorded sha256. Hashing on resume (~1/30 of the cost of writing a
    shard) is what lets shards be written without fsync: after a killed process or a
    crashed machine, whatever did not reach the disk whole is simply written again."""
    try:
        rec = json.loads((done_dir / f"{task.name}.json").read_bytes())
        entry = rec["shard"]
        ok = (
            rec["inputs"] == task.inputs
            and (entry["samples"], entry["bases"]) == (task.samples, task.bases)
            and (out_dir / entry["path"]).stat().st_size == entry["bytes"]
            and sha256_file(out_dir / entry["path"]) == entry["sha256"]
            and sha256_file(out_dir / entry["index"]) == entry["index_sha256"]
        )
    except (OSError, ValueError, KeyError):
        return None
    return entry if ok else None
