"""Byte-level tokenizer for DNA, RNA and protein sequences.

Every byte maps to one id (byte value + NUM_SPECIAL), so any byte string round-trips
exactly. Lower-case letters mark soft-masked repeats in genome assemblies: the model sees
the upper-case base (a repeat is still the same base) and the loss can down-weight it, so
`encode` upper-cases and returns the per-position soft-mask flag that `decode` uses to
restore the original case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The alphabets live torch-free in .alphabet (all that `hyena-glt pack` needs of the
# tokenizer); its users keep importing them from here.
from .alphabet import SeqType, detect_seq_type, reverse_complement  # noqa: F401

PAD_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


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
