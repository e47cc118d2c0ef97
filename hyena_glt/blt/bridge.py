"""The cross-attention bridge between bytes and patches, both directions, fully vectorized.

* `PatchPoolingAttention` (bytes -> patches): each patch's query (its mean byte plus its
  position encoding) attends to *its own* bytes only: a segment softmax (scores gathered per
  byte, normalised per patch with index-adds, weighted bytes index-added into the slots).
* `ByteFromPatchAttention` (patches -> bytes): each byte attends to the `window` patches
  *before its own patch* (patch ids pid-1, ..., pid-window). Those patches are complete
  before the byte, so the causal LM never sees the future; the global model's output at
  patch pid-1 already summarises every earlier patch. Under a lookahead patcher (the
  boundary at p depends on bytes up to p + lag) "its own patch" is the one holding byte
  i - lag (`PatchInfo.read_ids`): every boundary that decides what byte i reads is then
  settled by bytes <= i.

Both are multi-head with small key dimension (`KEY_DIM` per head) and keep the D x D
projections on the patch side (P = L / patch size rows): per byte the work is O(D + window * D),
never a (patches x bytes) matrix and never a D x D matmul over bytes beyond the key
projection. Head h's value is channel slice h (pooling: of the byte states, followed by an
output projection on the patches; unpooling: of the projected patch states).

Rows are laid out (head, key_dim) / (head, channel slice) so a tensor-parallel adapter can
split q/k/v column-wise by heads and the pool's `out_proj` row-wise, like attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import params
from .segments import PatchInfo, gather_slots, segment_sum

KEY_DIM = 16


class PatchPoolingAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, std: float, out_std: float, key_dim: int = KEY_DIM):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.q_proj = params.linear(d_model, num_heads * key_dim, std)
        self.k_proj = params.linear(d_model, num_heads * key_dim, std)
        self.out_proj = params.linear(d_model, d_model, out_std)

    def forward(self, byte_hidden: torch.Tensor, patch_query: torch.Tensor, info: PatchInfo) -> torch.Tensor:
        B, L, D = byte_hidden.shape
        P, H, kd = patch_query.shape[1], self.num_heads, self.key_dim
        q = self.q_proj(patch_query).view(B, P, H, kd)
        k = self.k_proj(byte_hidden).view(B, L, H, kd)
        score = (gather_slots(q, info.patch_ids) * k).sum(-1) * (1.0 / math.sqrt(kd))  # (B, L, H)
        # Softmax within each patch; the per-patch max only stabilises it (no gradient needed).
        with torch.no_grad():
            idx = info.patch_ids[:, :, None].expand(B, L, H)
            smax = score.new_full((B, P, H), float("-inf")).scatter_reduce(1, idx, score, reduce="amax")
            shift = torch.gather(smax, 1, idx)
        e = torch.exp(score - shift)
        denom = segment_sum(e, info.patch_ids, P)  # (B, P, H); 0 for padding slots
        weighted = (e[..., None] * byte_hidden.view(B, L, H, D // H)).view(B, L, D)
        pooled = segment_sum(weighted, info.patch_ids, P).view(B, P, H, D // H)
        pooled = pooled / denom.clamp_min(torch.finfo(denom.dtype).tiny)[..., None]
        return self.out_proj(pooled.reshape(B, P, D))


class ByteFromPatchAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, window: int, std: float, out_std: float, key_dim: int = KEY_DIM):
        super().__init__()
        self.num_heads, self.key_dim, self.window = num_heads, key_dim, window
        self.q_proj = params.linear(d_model, num_heads * key_dim, std)
        self.k_proj = params.linear(d_model, num_heads * key_dim, std)
        self.v_proj = params.linear(d_model, d_model, out_std)

    def forward(self, byte_hidden: torch.Tensor, patch_hidden: torch.Tensor, info: PatchInfo) -> torch.Tensor:
        B, L, D = byte_hidden.shape
        P, H, kd, W = patch_hidden.shape[1], self.num_heads, self.key_dim, self.window
        v = self.v_proj(patch_hidden)  # (B, P, D), head h = channel slice h
        # (B, L, W): patches before the byte's own (before the one it can vouch for, under a lag) only
        src = info.read_ids[:, :, None] - 1 - torch.arange(W, device=v.device)
        valid = src >= 0
        src = src.clamp_min(0)
        if W == 1:  # one candidate: its weight is 1 where it exists (bytes of patch 0 get nothing)
            return gather_slots(v, src[:, :, 0]) * valid[:, :, :1].to(v.dtype)
        q = self.q_proj(byte_hidden).view(B, L, H, kd)
        k = self.k_proj(patch_hidden).view(B, P, H, kd)
        # A short loop over the window offsets (not samples or patches): per offset one row
        # gather and plain elementwise ops, ~3x faster on CPU than one broadcast 5-D product.
        scale = 1.0 / math.sqrt(kd)
        score = torch.stack([(gather_slots(k, src[:, :, w]) * q).sum(-1) for w in range(W)], dim=2) * scale
        score = score.masked_fill(~valid[..., None], torch.finfo(score.dtype).min)  # (B, L, W, H)
        attn = torch.softmax(score, dim=2) * valid[..., None].to(score.dtype)
        out = attn[:, :, 0, :, None] * gather_slots(v, src[:, :, 0]).view(B, L, H, D // H)
        for w in range(1, W):
            out = out + attn[:, :, w, :, None] * gather_slots(v, src[:, :, w]).view(B, L, H, D // H)
        return out.reshape(B, L, D)
