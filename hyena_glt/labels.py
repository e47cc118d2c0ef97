"""Task labels: their syntax, and raw label strings -> the label tensors of the task kinds.

A labelled record's label (data_tools.labelled reads the files) is a string:

* `seq-cls`: a class name; the classes are the training labels, sorted (numerically when
  every name is a number), index = class id;
* `token-cls`: one symbol per base (`00111000`), or whitespace/comma-separated tokens, one per
  base; each is a class name as above;
* `regression`: a number, finite in float32.

-100 marks "no label" (positions that carry none, padding). Errors are ValueErrors naming the
record (`record_where`).
"""

from __future__ import annotations

import torch

IGNORE = -100  # the label of an output that has none (CE's ignore_index)


def record_where(where: str, record) -> str:
    """`FILE:LINE: record ID` (the line when the reader kept it)."""
    line = getattr(record, "line", None)
    return f"{where}{f':{line}' if line else ''}: record {record.id}"


def token_labels(label: str, length: int, where: str) -> list[str]:
    """Per-base labels: one symbol per base, or whitespace/comma-separated tokens, one per base."""
    tokens = label.replace(",", " ").split() if (" " in label or "," in label) else list(label)
    if len(tokens) != length:
        raise ValueError(f"{where}: {len(tokens)} token labels for a sequence of {length} bases")
    return tokens


def sort_labels(names) -> list[str]:
    """The distinct class names in class-index order: numerically if all are numbers, else
    as strings."""
    names = sorted(set(names))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def class_index(label: str, index: dict, where: str) -> int:
    if label not in index:
        raise ValueError(f"{where}: label {label!r} not among the training labels {list(index)}")
    return index[label]


# ---- raw label -> one example's label tensor: (raw, sequence, {name: index}, max_len, where) ----
def class_label(raw: str, seq: str, index: dict, max_len: int, where: str) -> torch.Tensor:
    return torch.tensor(class_index(raw, index, where))


def token_class_labels(raw: str, seq: str, index: dict, max_len: int, where: str) -> torch.Tensor:
    toks = token_labels(raw, len(seq), where)[:max_len]
    bad = sorted(set(toks) - set(index))
    if bad:
        raise ValueError(f"{where}: token labels {bad} not among the training labels {list(index)}")
    # The causal state at position i+1 has read base i: label it there; BOS gets none.
    return torch.tensor([IGNORE] + [index[t] for t in toks])


def regression_label(raw: str, seq: str, index: dict, max_len: int, where: str) -> torch.Tensor:
    try:
        value = torch.tensor([float(raw)])
    except ValueError:
        raise ValueError(f"{where}: regression label {raw!r} is not a number") from None
    if not bool(torch.isfinite(value).all()):  # nan, inf, or too large for float32 (1e39)
        raise ValueError(f"{where}: regression label {raw!r} is not a finite number")
    return value


# ---- label tensors -> the batch's: (labels, padded ids length) ----
def stack_labels(labels: list, length: int) -> torch.Tensor:
    return torch.stack(labels)


def pad_labels(labels: list, length: int) -> torch.Tensor:
    out = torch.full((len(labels), length), IGNORE, dtype=torch.long)
    for i, lab in enumerate(labels):
        out[i, : len(lab)] = lab
    return out
