"""Fine-tuning data: labelled files -> encoded examples -> batches, and metric lines.

Shared by the commands (launch/finetune/commands.py) and the training loop (launch/finetune/trainer.py),
which both import this module and not each other the other way round. What depends on the
task kind (label vocabulary, label encoding and batching, metric keys) is looked up in
hyena_glt.heads.TASK_KINDS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyena_glt.heads import task_kind
from hyena_glt.labels import record_where
from hyena_glt.tokenizer import PAD_ID, ByteTokenizer


@dataclass
class PreparedTask:
    kind: str
    train: list
    val: list | None
    label_names: list[str] | None
    num_labels: int


def encode_examples(records, kind: str, label_names: list[str] | None, max_len: int, where: str):
    """-> list of (ids (L+1,), label tensor or None). ids = [BOS] + bases (upper-cased)."""
    k = task_kind(kind)
    tok = ByteTokenizer()
    index = {n: i for i, n in enumerate(label_names or [])}
    out = []
    for r in records:
        ids = tok.encode(r.sequence[:max_len], add_bos=True).ids
        label = None
        if r.label is not None:
            label = k.encode_label(r.label, r.sequence, index, max_len, record_where(where, r))
        out.append((ids, label))
    return out


def collate(examples, kind: str, length: int | None = None):
    """(ids (B, L) padded with PAD, labels or None unless every example has one). L: `length`
    (co-training pads to the LM's sequence length), else the longest example."""
    L = length or max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), PAD_ID, dtype=torch.long)
    for i, (x, _) in enumerate(examples):
        ids[i, : len(x)] = x
    labels = None
    if all(lab is not None for _, lab in examples):
        labels = task_kind(kind).collate_labels([lab for _, lab in examples], L)
    return ids, labels


def prepare_task(kind: str, train_path: str, val_path: str | None, max_len: int) -> PreparedTask:
    """Read and encode one task's files; class names come from the training labels."""
    from data_tools.labelled import read_labelled

    k = task_kind(kind)
    train_records = read_labelled(train_path)
    val_records = read_labelled(val_path) if val_path else None
    label_names = k.label_names(train_records, train_path)
    if label_names is not None and len(label_names) < 2:
        raise ValueError(f"{train_path}: need at least two different labels for {kind}, found {label_names}")
    num_labels = len(label_names) if label_names is not None else 1
    train = encode_examples(train_records, kind, label_names, max_len, train_path)
    val = encode_examples(val_records, kind, label_names, max_len, val_path) if val_records else None
    return PreparedTask(kind, train, val, label_names, num_labels)


def fmt_metrics(m: dict, kind: str) -> str:
    """One line of a task's metrics (the kind's metric keys) and the example count."""
    return "  ".join(f"{key} {m[key]:.4f}" for key in task_kind(kind).metric_keys) + f"  (n={m['n']})"
