"""Windows -> the training batch dict every trainer in this repo consumes.

For a window w (ids of its bases), at a fixed seq_len:
  input_ids    = [BOS] + w[:-1]      labels = w     (labels[i] is the target at position i)
  loss_weights = 1.0 upper-case base, soft_mask_weight lower-case (soft-masked repeat) base,
                 0.0 padding
  seq_type     = SeqType value per sample
Shorter windows (record tails) are right-padded with PAD (id 0) at weight 0; longer ones
are cut to seq_len.
"""

from __future__ import annotations

import torch

from hyena_glt.tokenizer import BOS_ID, PAD_ID, ByteTokenizer, SeqType, reverse_complement

_TOKENIZER = ByteTokenizer()


def maybe_reverse_complement(seq: bytes, seq_type: int, flip: bool) -> bytes:
    if not flip or seq_type == SeqType.PROTEIN:
        return seq
    return reverse_complement(seq, rna=seq_type == SeqType.RNA)


def make_batch(samples: list[tuple[bytes, int]], seq_len: int, soft_mask_weight: float = 0.1) -> dict[str, torch.Tensor]:
    b = len(samples)
    input_ids = torch.full((b, seq_len), PAD_ID, dtype=torch.int64)
    labels = torch.full((b, seq_len), PAD_ID, dtype=torch.int64)
    weights = torch.zeros((b, seq_len), dtype=torch.float32)
    seq_type = torch.empty(b, dtype=torch.int64)
    for i, (seq, st) in enumerate(samples):
        seq = seq[:seq_len]
        n = len(seq)
        enc = _TOKENIZER.encode(seq, seq_type=st)
        labels[i, :n] = enc.ids
        input_ids[i, 0] = BOS_ID
        input_ids[i, 1:n] = enc.ids[: n - 1]
        weights[i, :n] = torch.where(enc.soft_mask, soft_mask_weight, 1.0)
        seq_type[i] = int(st)
    return {"input_ids": input_ids, "labels": labels, "loss_weights": weights, "seq_type": seq_type}
