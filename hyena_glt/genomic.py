"""Genomic adaptations of the input embedding, each behind a config flag.

* Sequence-type embedding: one learned vector per DNA / RNA / protein / mixed, added to
  every position, so one model can be trained on several molecule types.
* Motif branch: a bank of causal convolutions of motif-like widths (e.g. 6, 10, 16 bases:
  restriction sites, promoter boxes, binding sites) over the byte embeddings, projected
  back and added. Causal (left-padded) so the language model stays autoregressive.
"""

from __future__ import annotations

import torch
from torch import nn

from . import params
from .fftconv import fir_extend
from .spec import LOCAL, ModelSpec
from .tokenizer import SeqType


class SeqTypeEmbedding(nn.Module):
    def __init__(self, d_model: int, std: float):
        super().__init__()
        self.weight = params.new_param((len(SeqType), d_model), params.normal(std))

    def forward(self, seq_type: torch.Tensor) -> torch.Tensor:
        return self.weight[seq_type]  # (B, D): the caller broadcasts it over positions


class MotifBranch(nn.Module):
    """Replicated in every layout (it runs on the embedding, before any tensor split); its
    convolutions go through the spec so context parallelism sees across shard borders."""

    def __init__(self, d_model: int, kernel_sizes: list[int], std: float, spec: ModelSpec = LOCAL):
        super().__init__()
        self.spec = spec
        self.filters = nn.ParameterList(
            params.new_param((d_model, k), params.fan_in_uniform(k), no_weight_decay=True) for k in kernel_sizes
        )
        self.proj = params.linear(d_model * len(kernel_sizes), d_model, std)

    @property
    def history_len(self) -> int:
        return max(h.shape[-1] for h in self.filters) - 1

    def extend(self, x: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference (batch-first): the branch's output for new positions x (B, T, D) given the
        embeddings before them (B, D, history_len); returns (output, new history)."""
        xt = x.transpose(1, 2)
        if history is None:
            history = xt.new_zeros(*xt.shape[:-1], self.history_len)
        full = torch.cat([history.to(xt.dtype), xt], dim=-1)
        feats = [torch.nn.functional.silu(fir_extend(xt, h, history[..., history.shape[-1] - (h.shape[-1] - 1):])[0])
                 for h in self.filters]
        return self.proj(torch.cat(feats, dim=1).transpose(1, 2)), full[..., full.shape[-1] - self.history_len :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.spec.to_channels(x)
        feats = [torch.nn.functional.silu(self.spec.short_conv(xt, h)) for h in self.filters]
        return self.proj(self.spec.from_channels(torch.cat(feats, dim=1)))
