"""The inference cache: what a causal LM keeps to continue a sequence without recomputing it.

Per block (layer index -> dict of tensors, batch first), what its layer kind declares
(hyena_glt/kinds.py: `cache` the layout, `cache_state` the tensors and their shapes); for the
built-in kinds:
* Hyena operator: `feat` the featurizer's last K-1 inputs; `S`/`D` filters `fir` their last
  K-1 inputs (finite filters: a FIR state); `H` `modal` one value per channel and pole,
  s_t = exp(-rate) s_{t-1} + z_t (the long filter in modal form has an exact recurrence).
* attention: `k`, `v` (B, heads, capacity, head_dim), already rotated at their positions,
  `pos` (B, capacity) the global position of each key (PAD_POSITION for padding and unused
  capacity) and `n` the slots in use (the capacity doubles as keys arrive, unless the cache
  was made with the sequence's length as `capacity`). K/V are kept in the model's dtype, or
  in `kv_dtype` (e.g. bfloat16: half the memory; attention casts each block of keys back to
  the model's dtype as it reads it).
Input features: `motif` the motif branch's last inputs; `seq_type` (B,) of the batch.
`lengths` (B,) counts the positions each row has consumed: the next one is at `lengths`.
`kinds` maps each block to its kind's code: how its entry stacks (`stack`) is the kind's layout.

Rows may have different lengths (prompts of different lengths, `stack`): Hyena states do
not depend on position, and attention masks keys by position, so rows never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kinds import CACHE_KV, CACHE_RECURRENT, layer_kind
from .operators import PAD_POSITION  # attention's padded-key position, part of this module's API


@dataclass
class InferenceCache:
    lengths: torch.Tensor
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    motif: torch.Tensor | None = None
    seq_type: torch.Tensor | None = None
    kinds: dict[int, str] = field(default_factory=dict)  # block index -> its layer kind's code

    @classmethod
    def empty(cls, batch_size: int, seq_type: torch.Tensor | None = None, device=None, *, config=None,
              kv_dtype: torch.dtype | None = None, capacity: int = 0) -> InferenceCache:
        """A cache with nothing consumed yet. With `config` (the model's) and a `kv_dtype` or a
        `capacity`, every K/V block's entry (layout CACHE_KV) is made up front: K/V stored in
        `kv_dtype` (None: float32), with room for `capacity` positions (a stream that knows its
        length never regrows nor over-allocates its K/V). Without them, entries are made by
        the first chunk, in the model's dtype, and grow by doubling."""
        cache = cls(torch.zeros(batch_size, dtype=torch.long, device=device), seq_type=seq_type)
        if config is not None and (kv_dtype is not None or capacity):
            for i, code in enumerate(config.layers):
                if layer_kind(code).cache == CACHE_KV:
                    cache.layers[i] = empty_kv(layer_kind(code).cache_state(config, capacity), batch_size,
                                               kv_dtype or torch.float32, device)
                    cache.kinds[i] = code
        return cache

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def nbytes(self) -> int:
        tensors = [t for d in self.layers.values() for t in d.values()] + [self.motif]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    @classmethod
    def stack(cls, caches: list["InferenceCache"]) -> "InferenceCache":
        """One batch from caches of single rows (or batches) of any lengths. Each block's
        entries stack by its kind's cache layout: recurrent states concatenate, KV caches are
        left-padded to the longest (padded keys are masked by position)."""
        if not caches:
            raise ValueError("stack: no caches")
        if len(caches) == 1:
            return caches[0]
        out = cls(torch.cat([c.lengths for c in caches]))
        if any(c.seq_type is not None for c in caches):
            out.seq_type = torch.cat([c.seq_type for c in caches])
        if caches[0].motif is not None:
            out.motif = torch.cat([c.motif for c in caches])
        for i in caches[0].layers:
            code = caches[0].kinds[i]
            if any(c.kinds.get(i) != code for c in caches):
                raise ValueError(f"stack: block {i} holds different layer kinds across the caches (different models)")
            out.kinds[i] = code
            out.layers[i] = _STACK[layer_kind(code).cache]([c.layers[i] for c in caches])
        return out


def _stack_recurrent(entries: list[dict]) -> dict:
    """Fixed-size states per row: rows simply concatenate."""
    return {k: torch.cat([e[k] for e in entries]) for k in entries[0]}


def _stack_kv(entries: list[dict]) -> dict:
    """Keys/values by position: left-pad every row to the longest; padded keys get
    PAD_POSITION, so attention never sees them."""
    longest = max(e["n"] for e in entries)
    ks, vs, ps = [], [], []
    for e in entries:
        n = e["n"]
        k, v, p = e["k"][:, :, :n], e["v"][:, :, :n], e["pos"][:, :n]
        pad = longest - n
        ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
        vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        ps.append(torch.nn.functional.pad(p, (pad, 0), value=PAD_POSITION))
    return {"k": torch.cat(ks), "v": torch.cat(vs), "pos": torch.cat(ps), "n": longest}


def empty_kv(shapes: dict[str, tuple[int, ...]], batch_size: int, dtype: torch.dtype, device=None) -> dict:
    """An empty K/V entry of `shapes` (a CACHE_KV kind's `cache_state` at the capacity wanted):
    keys and values in `dtype`, every slot's position PAD_POSITION, `n` 0 slots in use."""
    entry: dict = {"n": 0}
    for name, shape in shapes.items():
        if name == "pos":
            entry[name] = torch.full((batch_size, *shape), PAD_POSITION, dtype=torch.long, device=device)
        else:
            entry[name] = torch.zeros((batch_size, *shape), dtype=dtype, device=device)
    return entry


KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The K/V cache dtype for a `--kv-dtype` name: `auto` (or None) is the model's dtype."""
    if name in (None, "auto"):
        return model_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"--kv-dtype: one of auto, {', '.join(KV_DTYPES)}; got {name!r}")
    return KV_DTYPES[name]


_STACK = {CACHE_RECURRENT: _stack_recurrent, CACHE_KV: _stack_kv}


def layer_state_shapes(config, length: int) -> dict[int, dict[str, tuple[int, ...]]]:
    """Per block, the shape (one sequence) of every tensor its cache entry holds after
    `length` positions, as each layer's kind declares it (attention: without the spare
    capacity its K/V buffers grow into): the memory a long generation plans for, without
    running the model."""
    return {i: dict(layer_kind(code).cache_state(config, length)) for i, code in enumerate(config.layers)}
