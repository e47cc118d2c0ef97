"""The sequence alphabets: seq types, their detection and the reverse complement.

Plain Python, no torch and no numpy: `hyena-glt pack` (data_tools) needs these and nothing
else of the model package, and importing torch (1-3 s) would be most of a small pack's time
and make every fork of a pack worker several times dearer. Importing this module loads no
torch: the package's `__init__` imports its parts lazily. `hyena_glt.tokenizer` re-exports
these names.
"""

from __future__ import annotations

from enum import IntEnum


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
