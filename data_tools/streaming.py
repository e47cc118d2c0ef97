"""Streaming loader for corpora too large to index: sequential reads of whole shards.

Built from webdataset: `WebDataset` with a node splitter over the *data-parallel* ranks
only (webdataset's own `split_by_node` takes the global torch.distributed rank, which would
hand the tensor-parallel ranks of one replica different data), `split_by_worker` over
DataLoader workers, a shuffle buffer, and with `resampled=True` an endless random draw of
shards cut into epochs of a given length. Every seed is derived from (seed, dp_rank,
worker), so the ranks of a model-parallel group see the same stream and a rerun repeats it.

Unlike `GlobalBatchLoader`, the batches depend on the data-parallel layout (each rank reads
its own shards); use this when a per-sample index is not affordable.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from .batching import make_batch, maybe_reverse_complement
from .loader import normalize_data
from .manifest import load_manifest
from .windows import SEQ_TYPE_BY_NAME


def split_by_dp_rank(dp_rank: int, dp_size: int):
    """A webdataset node splitter over data-parallel ranks."""

    def splitter(src):
        yield from islice(src, dp_rank, None, dp_size)

    return splitter


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _shard_urls(path: str, split: str) -> list[str]:
    shards = [s["path"] for s in load_manifest(path)["shards"] if s["split"] == split]
    if not shards:
        raise ValueError(f"{path}: the pack has no '{split}' shards")
    return [str(Path(path) / s) for s in shards]


def _to_sample(sample: dict) -> tuple[bytes, int]:
    meta = json.loads(sample["json"])
    return bytes(sample["seq"]), int(SEQ_TYPE_BY_NAME[meta["seq_type"]])


class StreamingDataset(torch.utils.data.IterableDataset):
    """Yields micro-batch dicts (see batching.make_batch). Wrap in
    `torch.utils.data.DataLoader(ds, batch_size=None, num_workers=k)` for parallel reads.

    data: a pack directory, a list of them, or {directory: weight} (mixed per sample with
    a seeded generator). resampled: draw shards at random forever, `epoch_batches` batches
    per pass; otherwise each rank reads its shards once per pass (shuffled by epoch).
    """

    def __init__(
        self,
        data,
        split: str = "train",
        seq_len: int = 8192,
        micro_batch_size: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        epoch_batches: int | None = None,
        reverse_complement_prob: float = 0.0,
        soft_mask_weight: float = 0.1,
    ):
        super().__init__()
        if resampled and not epoch_batches:
            raise ValueError("resampled streaming is endless: give epoch_batches (batches per pass)")
        weights = normalize_data(data)
        self.urls = [_shard_urls(p, split) for p in weights]
        w = np.array(list(weights.values()), dtype=np.float64)
        self.weights = w / w.sum()
        if not resampled:
            for p, urls in zip(weights, self.urls):
                if len(urls) < dp_size:
                    raise ValueError(f"{p}: {len(urls)} '{split}' shard(s) cannot be split over {dp_size} data-parallel ranks")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_buffer, self.resampled, self.epoch_batches = shuffle_buffer, resampled, epoch_batches
        self.reverse_complement_prob, self.soft_mask_weight = reverse_complement_prob, soft_mask_weight
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: call before each pass for a new shuffle (a
        DataLoader's worker copies cannot count passes themselves)."""
        self.epoch = epoch

    def _source(self, d: int, worker: int):
        import webdataset as wds

        urls = self.urls[d]
        seed = int(np.random.SeedSequence([self.seed, d, self.dp_rank, worker, self.epoch]).generate_state(1)[0])
        if self.resampled:
            # No node splitter: each data-parallel rank draws its own shards, seeded by its
            # dp rank (webdataset's default seed would use the global rank).
            shards = wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
            pipeline = wds.DataPipeline(shards, wds.tarfile_to_samples())
        else:
            pipeline = wds.WebDataset(
                urls, shardshuffle=len(urls), detshuffle=True, seed=self.seed * 1_000_003 + self.epoch,
                nodesplitter=split_by_dp_rank(self.dp_rank, self.dp_size), workersplitter=wds.split_by_worker,
                empty_check=False,
            )
        pipeline.append(wds.shuffle(self.shuffle_buffer, seed=seed))
        pipeline.append(wds.map(_to_sample))
        return iter(pipeline)

    def __iter__(self):
        worker, num_workers = _worker()
        sources = [self._source(d, worker) for d in range(len(self.urls))]
        rng = np.random.default_rng([self.seed, self.dp_rank, worker, self.epoch, 7])
        limit = None
        if self.epoch_batches:
            limit = self.epoch_batches // num_workers + (worker < self.epoch_batches % num_workers)
        batch, made = [], 0
        while limit is None or made < limit:
            d = int(rng.choice(len(sources), p=self.weights)) if len(sources) > 1 else 0
            try:
                seq, seq_type = next(sources[d])
            except StopIteration:  # a non-resampled pack ran out: the pass ends
                break
            flip = rng.random() < self.reverse_complement_prob
            batch.append((maybe_reverse_complement(seq, seq_type, flip), seq_type))
            if len(batch) == self.micro_batch_size:
                yield make_batch(batch, self.seq_len, self.soft_mask_weight)
                batch, made = [], made + 1


def streaming_loader(data, num_workers: int = 0, **kwargs):
    """A StreamingDataset, wrapped in a DataLoader when num_workers > 0."""
    ds = StreamingDataset(data, **kwargs)
    if num_workers == 0:
        return ds
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False)

