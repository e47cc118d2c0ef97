"""The inference cache: what a causal LM keeps to continue a sequence without recomputing it.

Per block (layer index -> dict of tensors, batch first):
* Hyena operator: `feat` the featurizer's last K-1 inputs; `S`/`D` filters `fir` their last
  K-1 inputs (finite filters: a FIR state); `H` `modal` one value per channel and pole,
  s_t = exp(-rate) s_{t-1} + z_t (the long filter in modal form has an exact recurrence).
* attention: `k`, `v` (B, heads, capacity, head_dim), already rotated at their positions,
  `pos` (B, capacity) the global position of each key (PAD_POSITION for padding and unused
  capacity) and `n` the slots in use (the capacity doubles as keys arrive).
Input features: `motif` the motif branch's last inputs; `seq_type` (B,) of the batch.
`lengths` (B,) counts the positions each row has consumed: the next one is at `lengths`.

Rows may have different lengths (prompts of different lengths, `stack`): Hyena states do
not depend on position, and attention masks keys by position, so rows never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD_POSITION = 1 << 62  # a padded key: later than every query (exact as a float, for F.pad)


@dataclass
class InferenceCache:
    lengths: torch.Tensor
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    motif: torch.Tensor | None = None
    seq_type: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch_size: int, seq_type: torch.Tensor | None = None, device=None) -> "InferenceCache":
        return cls(torch.zeros(batch_size, dtype=torch.long, device=device), seq_type=seq_type)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def nbytes(self) -> int:
        tensors = [t for d in self.layers.values() for t in d.values()] + [self.motif]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    @classmethod
    def stack(cls, caches: list["InferenceCache"]) -> "InferenceCache":
        """One batch from caches of single rows (or batches) of any lengths. Attention
        caches are left-padded to the longest; padded keys are masked by position."""
        if not caches:
            raise ValueError("stack: no caches")
        if len(caches) == 1:
            return caches[0]
        out = cls(torch.cat([c.lengths for c in caches]))
        if any(c.seq_type is not None for c in caches):
            out.seq_type = torch.cat([c.seq_type for c in caches])
        if caches[0].motif is not None:
            out.motif = torch.cat([c.motif for c in caches])
        for i, first in caches[0].layers.items():
            if "k" not in first:
                out.layers[i] = {k: torch.cat([c.layers[i][k] for c in caches]) for k in first}
                continue
            longest = max(c.layers[i]["n"] for c in caches)
            ks, vs, ps = [], [], []
            for c in caches:
                n = c.layers[i]["n"]
                k, v, p = c.layers[i]["k"][:, :, :n], c.layers[i]["v"][:, :, :n], c.layers[i]["pos"][:, :n]
                pad = longest - n
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
                ps.append(torch.nn.functional.pad(p, (pad, 0), value=PAD_POSITION))
            out.layers[i] = {"k": torch.cat(ks), "v": torch.cat(vs), "pos": torch.cat(ps), "n": longest}
        return out
