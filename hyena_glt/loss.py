"""Token-weighted cross entropy, returned as (sum, weight) so any parallel layout can
add partial sums across ranks and micro-batches and divide once: the loss of a global
batch is then the same whatever the split."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .tokenizer import NUM_SPECIAL


def default_loss_weights(labels: torch.Tensor) -> torch.Tensor:
    """1 for byte targets, 0 for specials, padding and ignored (-100) positions."""
    return (labels >= NUM_SPECIAL).float()


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token CE, shaped like `target`, computed in fp32 (fp64 for fp64 logits)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(compute).reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return ce.view(target.shape)


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor | None = None,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sum_i w_i * CE_i, sum_i w_i). `cross_entropy` is the spec's (vocab-parallel
    logits need megatron's)."""
    if loss_weights is None:
        loss_weights = default_loss_weights(labels)
    ce = cross_entropy(logits, labels.clamp_min(0))
    w = loss_weights.to(ce.dtype)
    return (ce * w).sum(), w.sum()
