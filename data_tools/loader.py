"""The default training loader: the same global batches for every parallel layout.

Global batch g is a function of (the packs and their weights, seed, global batch size,
reverse_complement_prob) only:
  * each of its global_batch_size slots picks a pack with a generator seeded by (seed, g)
    (numpy's SeedSequence; never Python's hash());
  * a pack's k-th pick is sample perm_e(k mod N) of epoch e = k // N, where perm_e is a
    pseudo-random permutation seeded by (seed, pack, e) (see permutation.py);
  * a slot is reverse-complemented when a (seed, g)-seeded draw is < reverse_complement_prob.
Data-parallel rank r of dp_size gets slots [r*G/dp_size, (r+1)*G/dp_size) as micro-batches
of micro_batch_size, and reads only those samples. Tensor/context/pipeline-parallel ranks
pass their data-parallel rank, so a model-parallel group gets the same samples. The state
(step, picks per pack) does not depend on dp_size, so a run may resume on another layout.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .batching import make_batch, maybe_reverse_complement
from .dataset import PackedDataset
from .permutation import epoch_picks

STATE_VERSION = 1


def normalize_data(data) -> dict[str, float]:
    if isinstance(data, (str, os.PathLike)):
        return {str(data): 1.0}
    if isinstance(data, Mapping):
        weights = {str(k): float(v) for k, v in data.items()}
    else:
        weights = {str(k): 1.0 for k in data}
    if not weights:
        raise ValueError("no packed dataset given")
    bad = [k for k, v in weights.items() if not v > 0]
    if bad:
        raise ValueError(f"dataset weights must be > 0: {bad}")
    return weights


class GlobalBatchLoader:
    """Infinite iterator over global steps; each item is this data-parallel rank's list of
    micro-batches (dicts, see batching.make_batch) for that step.

    data: a pack directory, a list of them (equal weights), or {directory: weight}.
    verify_shards: check every shard (and index) against the manifest's sha256 the first
    time this process opens it; a damaged one raises dataset.ShardChecksumError (one line
    naming it). None: on, unless HYENA_GLT_VERIFY_SHARDS=0. Only reads: the batches are the
    same either way, and the setting is not part of the resume state.
    """

    def __init__(
        self,
        data,
        split: str = "train",
        seq_len: int = 8192,
        global_batch_size: int = 8,
        micro_batch_size: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        reverse_complement_prob: float = 0.0,
        soft_mask_weight: float = 0.1,
        verify_shards: bool | None = None,
    ):
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a multiple of dp_size x micro_batch_size "
                f"({dp_size} x {micro_batch_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= reverse_complement_prob <= 1.0:
            raise ValueError("reverse_complement_prob must be in [0, 1]")
        weights = normalize_data(data)
        self.datasets = [PackedDataset(p, split, verify=verify_shards) for p in weights]
        for ds in self.datasets:
            if len(ds) == 0:
                raise ValueError(f"{ds.path}: the pack has no '{split}' samples")
            if ds.seq_len > seq_len:
                warnings.warn(f"{ds.path} was packed at seq_len {ds.seq_len}; windows are cut to {seq_len}", stacklevel=2)
        w = np.array(list(weights.values()), dtype=np.float64)
        self.weights = w / w.sum()
        self.seq_len, self.split = seq_len, split
        # Every batch has the same entries: with a pack that has tracks, samples of the others get the fill.
        self.conservation = any(ds.conservation for ds in self.datasets)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.reverse_complement_prob = reverse_complement_prob
        self.soft_mask_weight = soft_mask_weight
        self.step = 0
        self.consumed = [0] * len(self.datasets)

    # ---- the global sequence (identical on every rank) ----

    def global_batch_refs(self) -> tuple[list[tuple[int, int]], np.ndarray, list[int]]:
        """The next global batch as (pack, sample) pairs, its reverse-complement flags, and
        the picks per pack after it; does not advance."""
        g, n = self.step, self.global_batch_size
        if len(self.datasets) == 1:
            choice = np.zeros(n, dtype=np.int64)
        else:
            choice = np.random.default_rng([self.seed, g, 1]).choice(len(self.datasets), size=n, p=self.weights)
        flip = np.random.default_rng([self.seed, g, 2]).random(n) < self.reverse_complement_prob
        sample = np.empty(n, dtype=np.int64)
        consumed = list(self.consumed)
        for d, ds in enumerate(self.datasets):
            slots = np.flatnonzero(choice == d)
            if not len(slots):
                continue
            k = consumed[d] + np.arange(len(slots), dtype=np.int64)
            sample[slots] = epoch_picks(k, len(ds), f"{self.seed}:{d}")
            consumed[d] += len(slots)
        return list(zip(choice.tolist(), sample.tolist())), flip, consumed

    # ---- this rank's share ----

    def next_global_batch(self) -> list[dict]:
        refs, flip, consumed = self.global_batch_refs()
        per_rank = self.global_batch_size // self.dp_size
        lo = self.dp_rank * per_rank
        samples = []
        for slot in range(lo, lo + per_rank):
            d, i = refs[slot]
            seq, seq_type, scores = self.datasets[d].read_sample(i)
            seq, scores = maybe_reverse_complement(seq, seq_type, bool(flip[slot]), scores)
            samples.append((seq, seq_type, scores))
        self.step, self.consumed = self.step + 1, consumed
        m = self.micro_batch_size
        return [make_batch(samples[j : j + m], self.seq_len, self.soft_mask_weight, self.conservation)
                for j in range(0, per_rank, m)]

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_global_batch()

    # ---- resume ----

    def _identity(self) -> dict:
        return {
            "datasets": [ds.fingerprint for ds in self.datasets],
            "weights": self.weights.tolist(),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "reverse_complement_prob": self.reverse_complement_prob,
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "consumed": list(self.consumed), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if state.get("version") != STATE_VERSION or diff:
            raise ValueError(f"loader state was saved for other data or settings (differs in: {', '.join(diff) or 'version'})")
        missing = [k for k in ("step", "consumed") if k not in state]
        if missing:
            raise ValueError(f"loader state: missing key {missing[0]!r} (a damaged checkpoint?)")
        self.step, self.consumed = int(state["step"]), [int(c) for c in state["consumed"]]


def eval_batches(
    path: str | os.PathLike,
    seq_len: int,
    batch_size: int,
    split: str = "val",
    soft_mask_weight: float = 0.1,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_samples: int | None = None,
    verify_shards: bool | None = None,
) -> Iterator[dict]:
    """The `split` windows of one pack in a fixed order (manifest order), batched; with
    dp_size > 1 rank r gets batches r, r + dp_size, ... One pass, no shuffling: the same
    numbers on every run. `verify_shards` as for GlobalBatchLoader."""
    ds = PackedDataset(Path(path), split, verify=verify_shards)
    n = len(ds) if max_samples is None else min(len(ds), max_samples)
    for b, start in enumerate(range(0, n, batch_size)):
        if b % dp_size == dp_rank:
            yield make_batch([ds.read_sample(i) for i in range(start, min(start + batch_size, n))], seq_len,
                             soft_mask_weight, ds.conservation)
