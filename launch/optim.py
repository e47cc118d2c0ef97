"""AdamW with the no-weight-decay groups the model flags, and warmup + cosine LR."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Filters, conv taps, norms, biases and skips are tagged `no_weight_decay` by the model."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "no_weight_decay", False) or p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=1e-8)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """LR for 1-based `step`: linear warmup to base_lr, then cosine down to base_lr * min_ratio."""
    if warmup and step <= warmup:
        return base_lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
