"""Windows over a record, the train/val/test split of a record, and which job packs what.

Everything here is a pure function of the record (id, length, bases) and the options, so
every job and every worker computes the same answer on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hyena_glt.alphabet import SeqType

SPLITS = ("train", "val", "test")
SEQ_TYPE_NAMES = {SeqType.DNA: "DNA", SeqType.RNA: "RNA", SeqType.PROTEIN: "protein", SeqType.MIXED: "mixed"}
SEQ_TYPE_BY_NAME = {v: k for k, v in SEQ_TYPE_NAMES.items()}


def num_windows(length: int, seq_len: int, stride: int) -> int:
    """Windows start at 0, stride, 2*stride, ... up to the first window that reaches the
    end of the record, so with stride <= seq_len every base is in a window and no window
    lies inside the one before it. The last window may be shorter than seq_len."""
    if length <= 0:
        return 0
    return 1 + max(0, -(-(length - seq_len) // stride))


def window(k: int, length: int, seq_len: int, stride: int) -> tuple[int, int]:
    """[start, end) of window k (computed, not stored: a chromosome has millions)."""
    return k * stride, min(k * stride + seq_len, length)


def split_of(record_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A record's split from sha256(seed, id): the same id always lands in the same split
    (no leakage between files or jobs), and no dependence on Python's salted hash()."""
    digest = hashlib.sha256(f"{seed}\0{record_id}".encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def unknown_residue(seq_type: SeqType) -> bytes:
    """The letter of an unknown residue, counted (either case) against --max-n-fraction:
    N for nucleotides, X for protein (N is asparagine there)."""
    return b"X" if seq_type == SeqType.PROTEIN else b"N"


def strands_for(seq_type: SeqType, reverse_complement: str) -> tuple[str, ...]:
    # A protein has no reverse complement.
    if reverse_complement == "both" and seq_type != SeqType.PROTEIN:
        return ("+", "-")
    return ("+",)


@dataclass(frozen=True)
class Unit:
    """Consecutive windows of one record: what a job is handed in one piece."""

    first: int  # index of the first window
    stop: int  # one past the last window
    bases: int


def units(length: int, seq_len: int, stride: int, unit_bases: int) -> list[Unit]:
    """Cut a record's windows into runs of about `unit_bases` bases so that several jobs can
    share one long chromosome. Depends on the record only, never on the job count."""
    n = num_windows(length, seq_len, stride)
    per_unit = max(1, unit_bases // stride)
    out = []
    for first in range(0, n, per_unit):
        stop = min(first + per_unit, n)
        out.append(Unit(first, stop, window(stop - 1, length, seq_len, stride)[1] - first * stride))
    return out


class JobAssigner:
    """Deterministic greedy balancing: each unit goes to the job with the fewest bases so
    far (lowest index on ties). Every job sees the same units in the same order, so all
    agree on the owner of every unit without talking to each other."""

    def __init__(self, jobs: list[int]):
        self.load = {j: 0 for j in jobs}

    def take(self, bases: int) -> int:
        job = min(self.load, key=lambda j: (self.load[j], j))
        self.load[job] += bases
        return job


def assign_files(sizes: list[int], num_jobs: int) -> list[list[int]]:
    """Jobs that read each file. With at least as many files as jobs, each file goes whole
    to one job (largest first, to the least loaded job), so no job reads another's files;
    otherwise every job reads every file and its records are shared out by `Unit`."""
    if len(sizes) < num_jobs:
        return [list(range(num_jobs)) for _ in sizes]
    balance = JobAssigner(list(range(num_jobs)))
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = balance.take(sizes[i])
    return [[j] for j in owner]
