"""AdamW with the no-weight-decay groups the model flags, and warmup + cosine LR.

Pretraining (`hyena-glt train`, through optimizer_step.py) and fine-tuning
(`hyena-glt finetune`) both build their optimizer with `build_adamw` and set the LR of
every step with `lr_at`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AdamWSettings:
    """What optimizer_step.PlainOptimizer reads (pretraining passes its `train` config section,
    which has the same fields)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables


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
