"""Data tools: FASTA -> webdataset shards (`hyena-glt pack`), pack inspection
(`hyena-glt data stats`), and the training/evaluation loaders.

Loaders (imported lazily, so the CLI starts fast):
    GlobalBatchLoader   the training loader: same global batches for any parallel layout, exact resume
    eval_batches        a pack's validation windows in a fixed order
    PackedDataset       random access to one split of one pack
    make_batch          windows -> the batch dict (input_ids, labels, loss_weights, seq_type[, conservation])
"""

from importlib import import_module

_EXPORTS = {
    "GlobalBatchLoader": "loader",
    "eval_batches": "loader",
    "PackedDataset": "dataset",
    "make_batch": "batching",
    "PackOptions": "pack",
    "pack_job": "pack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'data_tools' has no attribute {name!r}")
