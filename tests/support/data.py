"""Helpers shared by the tests/test_data_*.py files (no tests here).

The reference FASTA parser and the tar reader are deliberately independent of data_tools:
a test that reads the output with the code that wrote it proves little.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

COMPLEMENT = bytes.maketrans(b"ACGTUNRYKMSWBDHVacgtunrykmswbdhv", b"TGCAANYRMKSWVHDBtgcaanyrmkswvhdb")


def revcomp(seq: bytes, rna: bool = False) -> bytes:
    out = seq.translate(COMPLEMENT)[::-1]
    return out.replace(b"T", b"U").replace(b"t", b"u") if rna else out


def read_fasta(path: Path) -> list[tuple[str, bytes]]:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    records: list[tuple[str, bytearray]] = []
    for line in raw.replace(b"\r", b"").split(b"\n"):
        if line.startswith(b">"):
            records.append((line[1:].split()[0].decode() if line[1:].split() else "", bytearray()))
        elif line.strip():
            records[-1][1].extend(line.strip())
    return [(name, bytes(seq)) for name, seq in records]


def write_fasta(path: Path, records, width: int = 80, crlf: bool = False, gz: bool = False) -> Path:
    nl = b"\r\n" if crlf else b"\n"
    out = bytearray()
    for name, seq in records:
        out += b">" + name.encode() + nl
        for i in range(0, len(seq), width if width else max(1, len(seq))):
            out += seq[i : i + (width or len(seq))] + nl
    data = gzip.compress(bytes(out)) if gz else bytes(out)
    Path(path).write_bytes(data)
    return Path(path)


def pack_samples(out: Path) -> dict[str, dict]:
    """key -> {'meta', 'seq', 'shard', and any other member by extension} for every sample
    in the pack's tar files."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(Path(out).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                entry = samples.setdefault(key, {"shard": tar_path.name})
                data = tf.extractfile(m).read()
                if ext == "json":
                    entry["meta"] = json.loads(data)
                elif ext == "seq":
                    entry["seq"] = data
                    entry["offset"] = m.offset_data
                else:  # e.g. "cons": conservation scores
                    entry[ext] = data
    return samples


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_bytes())


def completion_log(out: Path, job: int = 0) -> Path:
    return Path(out) / ".pack" / f"job-{job:05d}" / "completed.jsonl"


def completed_shards(out: Path, job: int = 0) -> list[str]:
    """The shards a job recorded as completed (whole lines of its completion log)."""
    try:
        lines = completion_log(out, job).read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(line)["shard"]["path"].removesuffix(".tar") for line in lines]


def forget_completed(out: Path, shard: str, job: int = 0) -> None:
    """Remove `shard`'s completion record, as if the job had been killed before writing it."""
    log = completion_log(out, job)
    lines = log.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["shard"]["path"] != f"{shard}.tar"]
    assert len(kept) == len(lines) - 1
    log.write_bytes(b"".join(kept))
