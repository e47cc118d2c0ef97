"""Windows -> the training batch dict every trainer in this repo consumes.

For a window w (ids of its bases), at a fixed seq_len:
  input_ids    = [BOS] + w[:-1]      labels = w     (labels[i] is the target at position i)
  loss_weights = 1.0 upper-case base, soft_mask_weight lower-case (soft-masked repeat) base,
                 0.0 padding
  seq_type     = SeqType value per sample
  conservation = (packs with conservation tracks) the score of the base at input_ids[i]:
                 [FILL] + scores[:-1], shifted like input_ids, so position i (which
                 predicts labels[i]) sees the scores of the bases it has seen and not that
                 of the base it predicts; FILL (0.0) at BOS, padding and bases without a
                 score (NaN in the shards), where the model's gate x (1 + g * 0) leaves
                 the operator output as it is
Shorter windows (record tails) are right-padded with PAD (id 0) at weight 0; longer ones
are cut to seq_len.
"""

from __future__ import annotations

import numpy as np
import torch

from hyena_glt.alphabet import SeqType, reverse_complement
from hyena_glt.tokenizer import BOS_ID, PAD_ID, ByteTokenizer

_TOKENIZER = ByteTokenizer()
CONSERVATION_FILL = 0.0


def maybe_reverse_complement(seq: bytes, seq_type: int, flip: bool, scores: np.ndarray | None = None
                             ) -> tuple[bytes, np.ndarray | None]:
    """The other strand of a window when `flip` (not for protein): its reverse complement,
    and its per-base scores (if any) reversed, so each score stays with its base."""
    if not flip or seq_type == SeqType.PROTEIN:
        return seq, scores
    return reverse_complement(seq, rna=seq_type == SeqType.RNA), None if scores is None else scores[::-1]


def make_batch(samples: list[tuple], seq_len: int, soft_mask_weight: float = 0.1,
               conservation: bool | None = None) -> dict[str, torch.Tensor]:
    """samples: (bases, seq_type) or (bases, seq_type, per-base scores or None).
    conservation: give the batch a `conservation` entry (None: when a sample has scores)."""
    b = len(samples)
    input_ids = torch.full((b, seq_len), PAD_ID, dtype=torch.int64)
    labels = torch.full((b, seq_len), PAD_ID, dtype=torch.int64)
    weights = torch.zeros((b, seq_len), dtype=torch.float32)
    seq_type = torch.empty(b, dtype=torch.int64)
    if conservation is None:
        conservation = any(len(s) > 2 and s[2] is not None for s in samples)
    scores = np.full((b, seq_len), CONSERVATION_FILL, dtype=np.float32) if conservation else None
    for i, (seq, st, *track) in enumerate(samples):
        seq = seq[:seq_len]
        n = len(seq)
        enc = _TOKENIZER.encode(seq, seq_type=st)
        labels[i, :n] = enc.ids
        input_ids[i, 0] = BOS_ID
        input_ids[i, 1:n] = enc.ids[: n - 1]
        weights[i, :n] = torch.where(enc.soft_mask, soft_mask_weight, 1.0)
        seq_type[i] = int(st)
        if scores is not None and track and track[0] is not None:
            scores[i, 1:n] = track[0][: n - 1]
    batch = {"input_ids": input_ids, "labels": labels, "loss_weights": weights, "seq_type": seq_type}
    if scores is not None:
        batch["conservation"] = torch.from_numpy(np.nan_to_num(scores, nan=CONSERVATION_FILL))
    return batch
