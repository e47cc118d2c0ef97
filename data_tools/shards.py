"""Shard names, the tar bytes of a sample, and writing, completing and resuming a shard.

A shard is a plain USTAR tar (webdataset layout: `<key>.json` then `<key>.seq` per sample)
whose bytes depend only on the samples in it, never on which process wrote them or when:
fixed mtime, owner and mode. The member headers are made here (`member_header`) from a
header that `tarfile` itself builds once, so the bytes are `tarfile`'s (and those of
webdataset's `TarWriter`, which wrote the shards before) without its per-member cost.

Each `.tar` gets a sidecar `.idx` (a numpy array: data offset, length and seq type of
every sample's `.seq` member) so loaders can `pread` one sample without scanning tars.

A shard's plan (`ShardFile`: samples, bases, tar length) is made before its bytes are
written, so the byte ranges that two files' samples take in one shard are known while
both are still being written, possibly by two processes (`ShardIO`), into the shard's
temporary files. `ShardIO.commit` ends the tar, writes the index, renames both into place
and returns the manifest entry.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np

INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("seq_type", "u1")])
_BLOCK, _RECORD = 512, 512 * 20  # tar block; tarfile pads the archive to 20 blocks
_FLUSH = 1 << 20  # bytes gathered before one write: few system calls, data still in cache


def shard_name(split: str, job: int, shard: int) -> str:
    return f"{split}-{job:05d}-{shard:06d}"


def sample_key_format(file_index: int, record_index: int, strand: str) -> bytes:
    """The sample keys of one record and strand, to be formatted with the window's start.
    No dots: webdataset takes everything before the first dot as the key."""
    return b"%05d-%09d-%%012d-%c" % (file_index, record_index, 102 if strand == "+" else 114)



def _header_template() -> bytes:
    """The header `webdataset.TarWriter` writes through `tarfile` for our fixed fields
    (USTAR, mode 0444, mtime 0, uid/gid 0, user and group hyena-glt), for an empty name and
    size 0: name, size and checksum are filled in per member."""
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uname, info.gname = 0o444, 0, "hyena-glt", "hyena-glt"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _header_template()
_MODE_TO_SIZE, _MTIME, _AFTER_CHKSUM = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
# The checksum is the sum of the header's bytes with its own field read as 8 spaces; this
# is that sum over the fields that never change.
_FIXED_SUM = sum(_MODE_TO_SIZE) + sum(_MTIME) + 8 * 32 + sum(_AFTER_CHKSUM)
# Pieces of headers by key length and suffix, size, and checksum: a shard's members repeat
# a handful of each, and building them is most of a member's cost.
_NAME_TAILS: dict[tuple[int, bytes], tuple[bytes, int]] = {}
_SIZE_FIELDS: dict[int, tuple[bytes, int]] = {}
_CHKSUM_FIELDS: dict[int, bytes] = {}  # at most 512 * 255 values


def _chksum_field(chksum: int) -> bytes:
    field = _CHKSUM_FIELDS.get(chksum)
    if field is None:
        field = _CHKSUM_FIELDS[chksum] = b"%06o\0 " % chksum
    return field


def member_header(key: bytes, suffix: bytes, size: int, key_sum: int | None = None) -> bytes:
    """tarfile's USTAR header of the member `key + suffix` holding `size` bytes."""
    tail = _NAME_TAILS.get((len(key), suffix))
    if tail is None:
        if len(key) + len(suffix) > 100:
            raise ValueError(f"tar member name {key + suffix!r} is too long for a plain USTAR header")
        pad = bytes(100 - len(key) - len(suffix))
        tail = _NAME_TAILS[len(key), suffix] = (suffix + pad + _MODE_TO_SIZE, sum(suffix))
    size_field = _SIZE_FIELDS.get(size)
    if size_field is None:
        if not 0 <= size < 8**11:
            raise ValueError(f"a tar member of {size} bytes does not fit a plain USTAR header")
        field = b"%011o\0" % size
        if len(_SIZE_FIELDS) >= 65536:
            _SIZE_FIELDS.clear()
        size_field = _SIZE_FIELDS[size] = (field, sum(field))
    chksum = _FIXED_SUM + (sum(key) if key_sum is None else key_sum) + tail[1] + size_field[1]
    return b"".join((key, tail[0], size_field[0], _MTIME, _chksum_field(chksum), _AFTER_CHKSUM))


# Per (key length, JSON length, bases): the parts of a sample's two member headers that do
# not depend on the key, the sums of their bytes, and the paddings, so that a sample costs
# one join (`_RangeWriter.add`); `member_header` gives the same bytes one header at a time.
_SAMPLE_PIECES: dict[tuple[int, int, int], tuple] = {}


def _sample_pieces(key_len: int, meta_len: int, seq_len: int) -> tuple:
    blank = bytes(key_len)
    pieces = []
    for suffix, size in ((b".json", meta_len), (b".seq", seq_len)):
        header = member_header(blank, suffix, size)
        rest = header[key_len:148]  # after the key, up to the checksum field
        # With a key of zero bytes, the stored checksum is the sum of everything but the key.
        pieces += [rest, int(header[148:154], 8), bytes(-size % _BLOCK)]
    if len(_SAMPLE_PIECES) >= 4096:  # records' last windows have many lengths: stay small
        _SAMPLE_PIECES.clear()
    return _SAMPLE_PIECES.setdefault((key_len, meta_len, seq_len), tuple(pieces))


_INDEX_ENTRY = struct.Struct("<QIB")  # one INDEX_DTYPE entry
assert _INDEX_ENTRY.size == INDEX_DTYPE.itemsize


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def tar_end(length: int) -> bytes:
    """What tarfile writes after the last member: two zero blocks, then zeros up to a
    multiple of its 20-block record."""
    end = length + 2 * _BLOCK
    return bytes(2 * _BLOCK + (-end % _RECORD))


class _HashingFile(io.RawIOBase):
    """Every byte written to a shard goes through here (and gets hashed on the way)."""

    def __init__(self, f, sha=None, count: int = 0):
        self.f, self.sha, self.count = f, sha, count

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.sha is not None:
            self.sha.update(b)
        self.count += len(b)
        return self.f.write(b)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary name and rename, so a reader (or a resumed run) sees the whole
    file or none of it. The temporary name is per process: two jobs may race to write the
    same (identical) manifest. `durable` also fsyncs (for manifests; shards need not, see
    `kept_record`)."""
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


def completion_record(shard: ShardFile, entry: dict, inputs: dict[str, str]) -> bytes:
    """What a resumed run checks before keeping the shard: with the same input bytes, the
    same first and last sample mean the same samples in between."""
    return json.dumps({"shard": entry, "inputs": inputs, "span": shard.span}, sort_keys=True).encode()


class ShardFile:
    """A shard's plan so far: name, split, and the samples, bases and tar bytes given to it.
    Small and picklable: it travels with the handover from one file's packing to the
    next. A shard kept from an earlier run (resume) carries that run's completion record."""

    def __init__(self, name: str, split: str, kept: dict | None = None):
        self.name, self.split, self.kept = name, split, kept
        self.samples = self.bases = 0
        self.length = 0  # tar bytes of its members
        self.first = self.last = b""  # keys of its first and last sample

    @property
    def span(self) -> list[str]:
        return [self.first.decode(), self.last.decode()]

    def place(self, key: bytes, meta_len: int, seq_len: int, cons_len: int = 0) -> None:
        """Give the shard one more sample (its .json and .seq members, and a .cons member of
        `cons_len` bytes when the pack has conservation tracks)."""
        if not self.samples:
            self.first = key
        self.last = key
        self.samples += 1
        self.length += 2 * _BLOCK + _padded(meta_len) + _padded(seq_len)
        if cons_len:
            self.length += _BLOCK + _padded(cons_len)

    @property
    def size(self) -> int:
        """Bytes of the finished tar."""
        return self.length + len(tar_end(self.length))


class _RangeWriter:
    """Writes one contiguous range of a shard's tar, from `offset` on, and the index
    entries of its samples, from sample `first_sample` on, into the shard's temporary
    files. Several processes may fill different ranges of one shard at the same time."""

    def __init__(self, out: Path, name: str, offset: int, first_sample: int, sha):
        self.out, self.name = out, name
        self.first_sample = first_sample  # of the entries in self.index
        self.index = bytearray()
        self.buf = bytearray()
        # No O_TRUNC: other processes may be writing other ranges of this file.
        fd = os.open(out / f".{name}.tar.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
        f = os.fdopen(fd, "wb")
        f.seek(offset)
        self.tar = _HashingFile(f, sha, offset)

    @property
    def end(self) -> int:
        return self.tar.count + len(self.buf)

    @property
    def samples_end(self) -> int:
        return self.first_sample + len(self.index) // INDEX_DTYPE.itemsize

    def add(self, key: bytes, meta: bytes, seq, seq_type: int, cons=None) -> None:
        """One sample: its .json and .seq members (and `cons`, the bytes of its .cons member,
        right after .seq, where the loaders find it from the .seq entry) and its index entry."""
        ml, sl = len(meta), len(seq)
        pieces = _SAMPLE_PIECES.get((len(key), ml, sl)) or _sample_pieces(len(key), ml, sl)
        json_rest, json_sum, meta_pad, seq_rest, seq_sum, seq_pad = pieces
        ks = sum(key)
        buf = self.buf
        data_at = self.tar.count + len(buf) + 2 * _BLOCK + ml + len(meta_pad)
        buf += b"".join((key, json_rest, _chksum_field(json_sum + ks), _AFTER_CHKSUM, meta, meta_pad,
                         key, seq_rest, _chksum_field(seq_sum + ks), _AFTER_CHKSUM, seq, seq_pad))
        if cons is not None:
            buf += b"".join((member_header(key, b".cons", len(cons), ks), cons, bytes(-len(cons) % _BLOCK)))
        self.index += _INDEX_ENTRY.pack(data_at, sl, seq_type)
        if len(buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            try:
                self.tar.write(self.buf)
            except OSError as e:
                raise _naming(e, self.out / f"{self.name}.tar") from e
            self.buf = bytearray()

    def landed(self) -> int:
        """Put what is written so far on disk, where other processes can read it; its end."""
        self.flush()
        self.tar.f.flush()
        return self.tar.count

    def sync(self) -> None:
        """Flush, and put the index entries held here into the temporary index file."""
        self.flush()
        if self.index:
            fd = os.open(self.out / f".{self.name}.idx.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, self.index, self.first_sample * INDEX_DTYPE.itemsize)
            finally:
                os.close(fd)
            self.first_sample = self.samples_end
            self.index = bytearray()

    def close(self) -> None:
        self.flush()
        self.tar.f.close()


class ShardIO:
    """The shard writers of one process. A writer stays open after its range, so the next
    range of the same shard in this process continues it (one file after another in a
    single process: the whole tar is written in order and hashed as it is written)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.writers: dict[str, _RangeWriter] = {}
        # sha256 of a shard's first `end` bytes, from writers that started at byte 0
        self.hashes: dict[str, tuple[object, int]] = {}

    def writer(self, name: str, offset: int, first_sample: int) -> _RangeWriter:
        w = self.writers.get(name)
        if w is not None and w.end == offset:
            return w
        if w is not None:
            self._retire(w)
        sha = hashlib.sha256() if offset == 0 else None
        if offset and name in self.hashes and self.hashes[name][1] == offset:
            sha = self.hashes.pop(name)[0]
        try:
            w = self.writers[name] = _RangeWriter(self.out, name, offset, first_sample, sha)
        except OSError as e:
            raise _naming(e, self.out / f"{name}.tar") from e
        return w

    def _retire(self, w: _RangeWriter) -> None:
        try:
            w.sync()
            w.close()
        except OSError as e:
            raise _naming(e, self.out / f"{w.name}.tar") from e
        del self.writers[w.name]
        if w.tar.sha is not None:
            self.hashes[w.name] = (w.tar.sha, w.end)

    def release(self) -> None:
        """Put everything on disk, so that any process can complete these shards."""
        for w in list(self.writers.values()):
            self._retire(w)

    def discard(self) -> None:
        for w in self.writers.values():
            w.tar.f.close()
        self.writers.clear()
        self.hashes.clear()

    def commit(self, shard: ShardFile, sha=None) -> dict:
        """End the shard's tar, write its index, rename both into place; the manifest entry.
        Every range of the shard must have been written (by any process) and released.
        `sha`: a sha256 of the tar's bytes so far, made by whoever read them (else the tar
        is hashed here, unless this process wrote all of it). A kept shard (resume) is
        checked against its record instead: ResumeMismatch if it differs."""
        if shard.kept is not None:
            entry = shard.kept["shard"]
            if ((entry["samples"], entry["bases"], entry["bytes"]) != (shard.samples, shard.bases, shard.size)
                    or shard.kept["span"] != shard.span):
                raise ResumeMismatch(f"{shard.name}: the earlier run's shard holds other samples")
            return entry
        try:
            return self._commit(shard, sha)
        except OSError as e:
            raise _naming(e, self.out / f"{shard.name}.tar") from e

    def _commit(self, shard: ShardFile, given_sha) -> dict:
        name, out = shard.name, self.out
        w = self.writer(name, shard.length, shard.samples)
        if given_sha is not None:
            w.tar.sha = given_sha
        w.buf += tar_end(shard.length)
        w.flush()
        w.tar.f.truncate(shard.size)  # a temporary file left by a killed run may be longer
        sha = w.tar.sha.hexdigest() if w.tar.sha is not None else None
        if w.first_sample == 0 and w.samples_end == shard.samples:
            index = bytes(w.index)
        else:
            w.sync()
            with open(out / f".{name}.idx.tmp", "rb") as f:
                index = f.read(shard.samples * INDEX_DTYPE.itemsize)
        w.close()
        del self.writers[name]
        self.hashes.pop(name, None)
        tmp_tar = out / f".{name}.tar.tmp"
        if sha is None:  # written by several processes: hash what they wrote
            sha = sha256_file(tmp_tar)
        if len(index) != shard.samples * INDEX_DTYPE.itemsize:
            raise RuntimeError(f"{name}: {len(index) // INDEX_DTYPE.itemsize} index entries for {shard.samples} samples")
        idx_bytes = _npy_header(shard.samples) + index
        idx_path = out / f"{name}.idx"
        atomic_write(idx_path, idx_bytes, durable=False)
        os.replace(tmp_tar, out / f"{name}.tar")
        (out / f".{name}.idx.tmp").unlink(missing_ok=True)
        return {
            "path": f"{name}.tar",
            "split": shard.split,
            "samples": shard.samples,
            "bases": shard.bases,
            "bytes": shard.size,
            "sha256": sha,
            "index": idx_path.name,
            "index_sha256": hashlib.sha256(idx_bytes).hexdigest(),
        }


@functools.lru_cache(maxsize=64)
def _npy_header(samples: int) -> bytes:
    """What `np.save` writes before the entries of an index of `samples` samples (shards
    of one pack mostly hold the same number, and np.save costs more than the rest of the
    index)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(samples, dtype=INDEX_DTYPE), allow_pickle=False)
    return buf.getvalue()[: -samples * INDEX_DTYPE.itemsize or None]


def _naming(e: OSError, tar_path: Path) -> OSError:
    """An OSError without a file name (a write to a full disk), naming the shard."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror, str(tar_path))
    return e


class ResumeMismatch(Exception):
    """A shard kept from an earlier run turned out not to be what this run makes."""


class CompletionLog:
    """The completion records of one job's shards (`completion_record`), one JSON line per
    shard appended to `DIR/.pack/job-NNNNN/completed.jsonl` once the shard and its index are
    in place. One file for the whole job: creating a file costs more than writing a small
    one (up to ~1 ms on a disk mounted with online discard) and a pack of small shards has
    thousands. Not synced, like the shards: a resumed job checks every record against the
    files it names (`kept_record`), and a line cut short by a kill is skipped. At the end of
    a job the log is rewritten to its planned shards in name order (`finish`), so the same
    pack leaves the same bytes there too, whatever the workers or an earlier run did."""

    NAME = "completed.jsonl"

    def __init__(self, done: Path):
        self.path = Path(done) / self.NAME
        self.fd: int | None = None
        self.torn = False  # the file ends in a line cut short: the next record starts a new one

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, dict]:
        """The last record of each shard name."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        self.torn = bool(data) and not data.endswith(b"\n")
        records = {}
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                records[rec["shard"]["path"].rsplit(".", 1)[0]] = rec
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # cut short by a kill
        return records

    def append(self, record: bytes) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.fd, b"\n" + record + b"\n" if self.torn else record + b"\n")
        self.torn = False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def clear(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.torn = False

    def finish(self, records: dict[str, bytes]) -> None:
        """Leave exactly `records` (name -> record), in name order."""
        self.close()
        want = b"".join(records[name] + b"\n" for name in sorted(records))
        try:
            if self.path.read_bytes() == want:
                return
        except FileNotFoundError:
            pass
        atomic_write(self.path, want, durable=False)


def kept_record(out: Path, rec: dict | None, input_sha: dict[str, str]) -> dict | None:
    """`rec`, the completion record of a shard from an earlier run, if that shard can be kept:
    every input it names still has the same sha256 (`input_sha`, hashed before packing)
    and the tar and index still hash to the recorded sha256. Hashing on resume is what
    lets shards be written without fsync: after a killed process or a crashed machine,
    whatever did not reach the disk whole is simply written again. Whether the shard
    holds the same samples is checked once it is planned (`ShardIO.commit`) and, for its
    inputs, by the job."""
    if rec is None:
        return None
    try:
        entry = rec["shard"]
        ok = (
            len(rec["span"]) == 2
            and all(input_sha.get(src) == sha for src, sha in rec["inputs"].items())
            and (out / entry["path"]).stat().st_size == entry["bytes"]
            and sha256_file(out / entry["path"]) == entry["sha256"]
            and sha256_file(out / entry["index"]) == entry["index_sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return rec if ok else None
