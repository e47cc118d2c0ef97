"""What the model's modules are built from: a spec of factories and kernels.

One `Block`, one Hyena operator, one attention, one MLP and one embedding exist (layers.py,
operators.py, model.py). They never decide how a linear layer, a convolution or attention
is computed; they ask their `ModelSpec`:

    column_linear(d_in, d_out, std)    y = x W^T, W (d_out, d_in); may hold a slice of d_out
    row_linear(d_in, d_out, std, bias) the same, may hold a slice of d_in (then sums partials,
                                       and adds the bias, which every rank holds whole, once)
    embedding(vocab, d_model, std)     token embedding (may hold a slice of the vocabulary)
    output_layer(d_model, vocab)       parameter-free: (hidden, weight) -> logits
    cross_entropy(logits, target)      per-token CE from what output_layer returned
    short_conv(u, h, skip)             causal depthwise conv with explicit taps (featurizer, S, motif)
    long_conv(z, filter)               causal conv with a D or H filter module over the full context
    attention(q, k, v, positions)      causal scaled-dot-product attention
    enter_sequence_region(x)           what follows the embedding (e.g. split the sequence)

and, for the token-merging U-shape, whose patcher and bridge need whole sequences between
stacks of blocks that may each hold a share of one:

    split_context(t)                   (B, L, ...) whole -> the context share the blocks see
                                       (no gradient: ids, positions)
    to_blocks(x) / from_blocks(y)      (B, L, D) whole <-> the blocks' layout and share, with
                                       gradients; whole-sequence work done by every rank is
                                       weighted `whole_loss_scale` in the loss
    sequence_multiple                  what a block input's length must be a multiple of
    context_chunks                     how many chunks of a sequence the context split makes

plus the shape of this rank's share: `tp`/`tp_rank` (channel groups, heads and MLP columns
split into `tp` contiguous parts), the activation layout (`seq_first`: (L, B, D) as in
megatron-core, else (B, L, D)) and `sequence_parallel` (norms then see a slice of the
sequence: their parameters are tagged so a trainer sums their gradients).

`LOCAL` is the single-device spec: nn.Linear, the local FFT/direct convolutions and
PyTorch's SDPA. megatron_adapters builds the parallel one (megatron-core column/row-parallel
linears, vocab-parallel embedding and cross entropy, halo / all-to-all context-parallel
convolutions, CP attention) and passes it in; this package never imports megatron-core.
A new block option is written once, in the module that uses it, for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .fftconv import causal_conv
from .loss import token_cross_entropy

Tensor = torch.Tensor


class LocalOutputLayer(nn.Module):
    """Logits from hidden states and the output weight (the embedding when tied)."""

    def forward(self, hidden: Tensor, weight: Tensor) -> Tensor:
        return F.linear(hidden, weight)


def local_embedding(vocab: int, d_model: int, std: float) -> nn.Module:
    emb = nn.Embedding(vocab, d_model)
    params.tag(emb.weight, params.normal(std))
    return emb


def local_linear(d_in: int, d_out: int, std: float, bias: bool = False) -> nn.Module:
    return params.linear(d_in, d_out, std, bias=bias)


def local_output_layer(d_model: int, vocab: int) -> nn.Module:
    return LocalOutputLayer()


def same(x: Tensor) -> Tensor:
    return x


def local_long_conv(z: Tensor, filt: nn.Module) -> Tensor:
    return filt.conv(z)


def local_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    # Positions only enter through RoPE here: local order is causal order.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str = "single-device"
    column_linear: Callable[[int, int, float], nn.Module] = local_linear
    row_linear: Callable[..., nn.Module] = local_linear
    embedding: Callable[[int, int, float], nn.Module] = local_embedding
    output_layer: Callable[[int, int], nn.Module] = local_output_layer
    cross_entropy: Callable[[Tensor, Tensor], Tensor] = token_cross_entropy
    short_conv: Callable[..., Tensor] = causal_conv
    long_conv: Callable[[Tensor, nn.Module], Tensor] = local_long_conv
    attention: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = local_attention
    enter_sequence_region: Callable[[Tensor], Tensor] = same
    split_context: Callable[[Tensor], Tensor] = same
    to_blocks: Callable[[Tensor], Tensor] = same
    from_blocks: Callable[[Tensor], Tensor] = same
    sequence_multiple: int = 1
    context_chunks: int = 1
    whole_loss_scale: float = 1.0
    tp: int = 1
    tp_rank: int = 0
    seq_first: bool = False
    sequence_parallel: bool = False

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    # ---- activation layout: Hyena convolutions run channel-first (B, C, L)
    def to_channels(self, x: Tensor) -> Tensor:
        return x.permute(1, 2, 0) if self.seq_first else x.transpose(1, 2)

    def from_channels(self, y: Tensor) -> Tensor:
        return y.permute(2, 0, 1) if self.seq_first else y.transpose(1, 2)

    def seq_len(self, x: Tensor) -> int:
        return x.shape[0] if self.seq_first else x.shape[1]

    def local(self, n: int, what: str) -> int:
        """This rank's share of `n` channels / groups / heads (split over tp, contiguous)."""
        if n % self.tp:
            raise ValueError(f"{what}={n} is not divisible by tp={self.tp}")
        return n // self.tp

    def mark_sequence_split(self, module_or_param: nn.Module | nn.Parameter) -> None:
        """Parameters used between blocks, where sequence parallelism splits the sequence
        over TP ranks: each rank's gradient covers its slice, so they must be summed over TP."""
        if not self.sequence_parallel:
            return
        ps = [module_or_param] if isinstance(module_or_param, nn.Parameter) else module_or_param.parameters()
        for p in ps:
            p.sequence_parallel = True


LOCAL = ModelSpec()
