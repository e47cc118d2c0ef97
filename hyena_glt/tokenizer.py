"""Byte-level tokenizer for DNA, RNA and protein sequences.

Every byte maps to one id (byte value + NUM_SPECIAL), so any byte string round-trips
exactly. Lower-case letters mark soft-masked repeats in genome assemblies: the model sees
the upper-case base (a repeat is still the same base) and the loss can down-weight it, so
`encode` upper-cases and returns the per-position soft-mask flag that `decode` uses to
restore the original case.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

PAD_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


class SeqType(IntEnum):
    DNA = 0
    RNA = 1
    PROTEIN = 2
    MIXED = 3


# IUPAC nucleotide complements (upper case; lower case is derived so case is preserved).
_DNA_PAIRS = {
    "A": "T", "T": "A", "C": "G", "G": "C", "U": "A",
    "R": "Y", "Y": "R", "K": "M", "M": "K", "S": "S", "W": "W",
    "B": "V", "V": "B", "D": "H", "H": "D", "N": "N",
}


def _complement_table(pairs: dict[str, str]) -> bytes:
    table = bytearray(range(256))
    for base, comp in pairs.items():
        table[ord(base)] = ord(comp)
        table[ord(base.lower())] = ord(comp.lower())
    return bytes(table)


_DNA_COMPLEMENT = _complement_table(_DNA_PAIRS)
_RNA_COMPLEMENT = _complement_table({**_DNA_PAIRS, "A": "U"})

_NUCLEOTIDES = frozenset(b"ACGTUNRYKMSWBDHV-.")
_AMINO_ACIDS = frozenset(b"ACDEFGHIKLMNPQRSTVWYBZXJUO*-.")


def reverse_complement(seq: bytes | str, rna: bool = False) -> bytes:
    """IUPAC-aware, case-preserving reverse complement. Bytes that are not nucleotide
    codes (gaps, digits, ...) are kept as they are, so it is an involution for DNA."""
    if isinstance(seq, str):
        seq = seq.encode("ascii")
    return seq.translate(_RNA_COMPLEMENT if rna else _DNA_COMPLEMENT)[::-1]


def detect_seq_type(seq: bytes | str) -> SeqType:
    """DNA if only nucleotide codes and no U; RNA if U but no T; protein if amino-acid
    letters beyond the nucleotide codes appear; MIXED otherwise (e.g. T and U together,
    or bytes that are neither)."""
    if isinstance(seq, str):
        seq = seq.encode("ascii", errors="replace")
    letters = frozenset(seq.upper())
    if letters <= _NUCLEOTIDES:
        has_t, has_u = ord("T") in letters, ord("U") in letters
        if has_t and has_u:
            return SeqType.MIXED
        return SeqType.RNA if has_u else SeqType.DNA
    if letters <= _AMINO_ACIDS:
        return SeqType.PROTEIN
    return SeqType.MIXED


@dataclass(frozen=True)
class Encoded:
    ids: torch.Tensor  # (L,) int64
    soft_mask: torch.Tensor  # (L,) bool, True where the source byte was lower case
    seq_type: SeqType


class ByteTokenizer:
    """bytes <-> ids. Ids 0..3 are PAD, BOS, EOS, SEP; byte b is id b + 4."""

    pad_id, bos_id, eos_id, sep_id = PAD_ID, BOS_ID, EOS_ID, SEP_ID
    num_special = NUM_SPECIAL
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, uppercase: bool = True):
        self.uppercase = uppercase

    def encode(
        self,
        seq: bytes | str,
        add_bos: bool = False,
        add_eos: bool = False,
        seq_type: SeqType | None = None,
    ) -> Encoded:
        if isinstance(seq, str):
            seq = seq.encode("utf-8")
        raw = np.frombuffer(seq, dtype=np.uint8)
        lower = (raw >= ord("a")) & (raw <= ord("z"))
        if self.uppercase:
            raw = np.where(lower, raw - 32, raw)
        else:
            lower = np.zeros_like(lower)
        ids = raw.astype(np.int64) + NUM_SPECIAL
        if add_bos:
            ids, lower = np.concatenate([[BOS_ID], ids]), np.concatenate([[False], lower])
        if add_eos:
            ids, lower = np.concatenate([ids, [EOS_ID]]), np.concatenate([lower, [False]])
        return Encoded(
            ids=torch.from_numpy(np.ascontiguousarray(ids)),
            soft_mask=torch.from_numpy(np.ascontiguousarray(lower)),
            seq_type=detect_seq_type(seq) if seq_type is None else SeqType(seq_type),
        )

    def decode(self, ids, soft_mask=None, skip_special: bool = True) -> bytes:
        """Inverse of `encode`: with the soft mask it restores the original case exactly."""
        ids = torch.as_tensor(ids).cpu().numpy().astype(np.int64)
        keep = ids >= NUM_SPECIAL
        if not skip_special and not keep.all():
            raise ValueError("decode: special ids have no byte form; pass skip_special=True")
        raw = (ids - NUM_SPECIAL).clip(0, 255).astype(np.uint8)
        if soft_mask is not None:
            lower = torch.as_tensor(soft_mask).cpu().numpy().astype(bool)
            raw = np.where(lower, raw + 32, raw).astype(np.uint8)
        return raw[keep].tobytes()

    def is_byte(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= NUM_SPECIAL
