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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.spec.to_channels(x)
        feats = [torch.nn.functional.silu(self.spec.short_conv(xt, h)) for h in self.filters]
        return self.proj(self.spec.from_channels(torch.cat(feats, dim=1)))
