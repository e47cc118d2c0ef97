"""Sequence mixers: the Hyena operator (S, D, H) and causal attention with RoPE (*).

Hyena operator, per StripedHyena 2:
    u = in_proj(x)                       D -> 3D, channels laid out (group, channel, x1|x2|v)
    u = featurizer(u)                    depthwise causal conv, length 3, all 3D channels
    x1, x2, v = split(u)
    z = x2 * v
    z = filter(z)                        causal conv with h (S, D or H) + skip * z
    y = out_proj(x1 * z)                 D -> D

The interleaved (group, channel, x1|x2|v) layout makes a contiguous split of in_proj's
output rows (what a column-parallel layer does) hand each tensor-parallel rank whole groups
with their x1, x2 and v together. The other layout (x1 | x2 | v blocks) silently mixes
groups across ranks at TP > 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .config import HyenaGLTConfig
from .filters import DecayedMediumFilter, GroupedShortFilter, ModalFilter, ShortConv


def split_interleaved(u: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3C, L) in (group, channel, x1|x2|v) order -> three (B, C, L) tensors."""
    B, C3, L = u.shape
    u = u.view(B, groups, C3 // (3 * groups), 3, L)
    return tuple(u[:, :, :, k].reshape(B, C3 // 3, L) for k in range(3))


def make_filter(code: str, cfg: HyenaGLTConfig) -> nn.Module:
    if code == "S":
        return GroupedShortFilter(cfg.d_model, cfg.num_filter_groups, cfg.short_filter_len)
    if code == "D":
        return DecayedMediumFilter(
            cfg.d_model, cfg.num_filter_groups, cfg.medium_filter_len, cfg.medium_decay_min, cfg.medium_decay_max
        )
    if code == "H":
        return ModalFilter(cfg.d_model, cfg.modal_order, cfg.max_seq_len)
    raise ValueError(f"no Hyena filter for layer code {code!r}")


class HyenaOperator(nn.Module):
    def __init__(self, code: str, cfg: HyenaGLTConfig, out_std: float):
        super().__init__()
        self.code = code
        self.groups = cfg.num_filter_groups
        self.in_proj = params.linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.featurizer = ShortConv(3 * cfg.d_model, cfg.featurizer_len)
        self.filter = make_filter(code, cfg)
        self.out_proj = params.linear(cfg.d_model, cfg.d_model, out_std)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        u = self.featurizer(self.in_proj(x).transpose(1, 2))
        x1, x2, v = split_interleaved(u, self.groups)
        z = self.filter(x2 * v)
        return self.out_proj((x1 * z).transpose(1, 2))


def rope(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding. x: (B, heads, L, head_dim); position_ids: (B or 1, L), global positions
    (under context parallelism they are the zigzag positions, not 0..L_local-1)."""
    half = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=compute) / half)
    angles = position_ids.to(compute)[:, None, :, None] * inv_freq  # (B, 1, L, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention. qkv rows laid out (head, q|k|v, head_dim) so a contiguous
    tensor-parallel split hands each rank whole heads."""

    code = "*"

    def __init__(self, cfg: HyenaGLTConfig, out_std: float):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = cfg.num_heads, cfg.head_dim, cfg.rope_base
        self.qkv_proj = params.linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.out_proj = params.linear(cfg.d_model, cfg.d_model, out_std)

    def project_qkv(self, x: torch.Tensor, position_ids: torch.Tensor):
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # 3, B, h, L, hd
        q, k, v = qkv[0], qkv[1], qkv[2]
        return rope(q, position_ids, self.rope_base), rope(k, position_ids, self.rope_base), v

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None]
        q, k, v = self.project_qkv(x, position_ids)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))


def make_mixer(code: str, cfg: HyenaGLTConfig, layer_index: int) -> nn.Module:
    # GPT-2 style: residual-branch outputs scaled down with depth.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    if code == "*":
        return CausalSelfAttention(cfg, out_std)
    return HyenaOperator(code, cfg, out_std)
