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

Linear layers, convolution backends and the attention kernel come from the spec
(spec.py): the same modules run on one device and in every parallel layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import HyenaGLTConfig
from .fftconv import fir_extend
from .filters import DecayedMediumFilter, GroupedShortFilter, ModalFilter, ShortConv
from .spec import LOCAL, ModelSpec

# Inference (`extend`): single device, batch-first. Every mixer continues a sequence from its
# cache entry (hyena_glt/cache.py) and returns the new one; `position_ids` (B, T) are global.


def split_interleaved(u: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3C, L) in (group, channel, x1|x2|v) order -> three (B, C, L) tensors."""
    B, C3, L = u.shape
    u = u.view(B, groups, C3 // (3 * groups), 3, L)
    return tuple(u[:, :, :, k].reshape(B, C3 // 3, L) for k in range(3))


def make_filter(code: str, cfg: HyenaGLTConfig, spec: ModelSpec = LOCAL) -> nn.Module:
    """The S, D or H filter of this rank's channels (whole groups)."""
    spec.local(cfg.num_filter_groups, "num_filter_groups")
    if code == "S":
        return GroupedShortFilter(cfg.d_model, cfg.num_filter_groups, cfg.short_filter_len, spec.tp, cfg.short_filter_skip)
    if code == "D":
        return DecayedMediumFilter(cfg.d_model, cfg.num_filter_groups, cfg.medium_filter_len, cfg.medium_decay_min,
                                   cfg.medium_decay_max, spec.tp, spec.tp_rank, cfg.medium_decay)
    if code == "H":
        return ModalFilter(cfg.d_model, cfg.modal_order, cfg.max_seq_len, spec.tp)
    raise ValueError(f"no Hyena filter for layer code {code!r}")


class HyenaOperator(nn.Module):
    def __init__(self, code: str, cfg: HyenaGLTConfig, out_std: float, spec: ModelSpec = LOCAL):
        super().__init__()
        self.code, self.spec = code, spec
        self.groups = spec.local(cfg.num_filter_groups, "num_filter_groups")  # split_interleaved sees local groups
        self.in_proj = spec.column_linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.featurizer = ShortConv(3 * cfg.d_model // spec.tp, cfg.featurizer_len)
        self.filter = make_filter(code, cfg, spec)
        self.out_proj = spec.row_linear(cfg.d_model, cfg.d_model, out_std, bias=cfg.mixer_out_bias)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        u = spec.short_conv(spec.to_channels(self.in_proj(x)), self.featurizer.weight)
        x1, x2, v = split_interleaved(u, self.groups)
        z = x2 * v
        if self.code == "S":
            z = spec.short_conv(z, self.filter.filter(), self.filter.skip)
        else:
            z = spec.long_conv(z, self.filter)
        return self.out_proj(spec.from_channels(x1 * z))

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        state = state or {}
        u, feat = fir_extend(self.in_proj(x).transpose(1, 2), self.featurizer.weight, state.get("feat"))
        x1, x2, v = split_interleaved(u, self.groups)
        z = x2 * v
        if self.code == "H":
            y, filt_state = self.filter.extend(z, state.get("modal"))
            new = {"feat": feat, "modal": filt_state}
        else:
            y, filt_state = fir_extend(z, self.filter.filter(), state.get("fir"))
            new = {"feat": feat, "fir": filt_state}
        if self.filter.skip is not None:
            y = y + self.filter.skip.to(z.dtype)[:, None] * z
        return self.out_proj((x1 * y).transpose(1, 2)), new


def rope(x: torch.Tensor, position_ids: torch.Tensor, base: float, position_scale: float = 1.0) -> torch.Tensor:
    """Rotary embedding (NeoX half rotation). x: (B, heads, L, head_dim); position_ids: (B or 1,
    L), global positions (under context parallelism the zigzag positions, not 0..L_local-1),
    divided by `position_scale` (position interpolation: a model trained at length N then runs
    at scale * N with the angles it knows)."""
    half = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=compute) / half)
    pos = position_ids.to(compute) if position_scale == 1.0 else position_ids.to(compute) / position_scale
    angles = pos[:, None, :, None] * inv_freq  # (B, 1, L, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention. qkv rows laid out (head, q|k|v, head_dim) so a contiguous
    tensor-parallel split hands each rank whole heads."""

    code = "*"

    def __init__(self, cfg: HyenaGLTConfig, out_std: float, spec: ModelSpec = LOCAL):
        super().__init__()
        self.spec = spec
        self.num_heads, self.head_dim, self.rope_base = spec.local(cfg.num_heads, "num_heads"), cfg.head_dim, cfg.rope_base
        self.rope_scale = cfg.rope_position_scale
        self.qkv_proj = spec.column_linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.out_proj = spec.row_linear(cfg.d_model, cfg.d_model, out_std, bias=cfg.mixer_out_bias)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        qkv = self.qkv_proj(x)  # (B, L, 3D/tp) or (L, B, 3D/tp): the full (CP-local) sequence
        if spec.seq_first:
            L, B, _ = qkv.shape
            qkv = qkv.view(L, B, self.num_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4)  # 3, B, h, L, hd
        else:
            B, L, _ = qkv.shape
            qkv = qkv.view(B, L, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]  # (B or 1, L)
        q, k = rope(qkv[0], pos, self.rope_base, self.rope_scale), rope(qkv[1], pos, self.rope_base, self.rope_scale)
        y = spec.attention(q, k, qkv[2], pos)  # (B, h, L, hd)
        y = y.permute(2, 0, 1, 3) if spec.seq_first else y.transpose(1, 2)
        return self.out_proj(y.reshape(*y.shape[:2], self.num_heads * self.head_dim))

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = (rope(qkv[0], position_ids, self.rope_base, self.rope_scale),
                   rope(qkv[1], position_ids, self.rope_base, self.rope_scale), qkv[2])
        if state is None and bool((position_ids == position_ids[:1]).all()):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # as the forward does
            new = {"k": k, "v": v, "pos": position_ids.expand(B, T).contiguous(), "n": T}
        else:
            new = _append_kv(state, k, v, position_ids)
            n = new["n"]
            y = blocked_attention(q, new["k"][:, :, :n], new["v"][:, :, :n], position_ids, new["pos"][:, :n])
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1)), new


def _append_kv(state: dict | None, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> dict:
    """Write new keys/values after the first `n` of the cache, growing its capacity by
    doubling (amortised O(1) per token, not a copy of the whole cache every step). Unused
    slots hold PAD_POSITION, so attention never sees them."""
    from .cache import PAD_POSITION

    B, h, T, hd = k.shape
    if state is None:
        state = {"k": k.new_zeros(B, h, 0, hd), "v": v.new_zeros(B, h, 0, hd),
                 "pos": pos.new_full((B, 0), PAD_POSITION), "n": 0}
    n, cap = state["n"], state["k"].shape[2]
    if n + T > cap:
        cap = max(2 * cap, n + T, 256)
        grown = {"k": k.new_zeros(B, h, cap, hd), "v": v.new_zeros(B, h, cap, hd),
                 "pos": pos.new_full((B, cap), PAD_POSITION), "n": n}
        grown["k"][:, :, :n], grown["v"][:, :, :n] = state["k"][:, :, :n], state["v"][:, :, :n]
        grown["pos"][:, :n] = state["pos"][:, :n]
        state = grown
    state["k"][:, :, n : n + T] = k
    state["v"][:, :, n : n + T] = v
    state["pos"][:, n : n + T] = pos
    state["n"] = n + T
    return state


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      scores_per_block: int = 1 << 24) -> torch.Tensor:
    """Attention of queries at global positions q_pos (B, T) over keys at k_pos (B, Lk), a key
    visible when k_pos <= q_pos, in blocks of keys with a running softmax, so memory is
    O(B h T block) however long the cache (no (T, Lk) mask or score matrix). When the mask is
    small (a decode step, T = 1), PyTorch's SDPA kernel reads the whole cache at once."""
    B, h, T, _ = q.shape
    if B * T * k.shape[2] <= scores_per_block:  # the mask is small: PyTorch's fused kernel (a decode step)
        visible = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, T, Lk)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
    scale = q.shape[-1] ** -0.5
    block = max(1024, scores_per_block // (B * h * T))
    m = q.new_full((B, h, T), float("-inf"))
    denom = q.new_zeros((B, h, T))
    acc = torch.zeros_like(q)
    for s in range(0, k.shape[2], block):
        e = min(s + block, k.shape[2])
        scores = torch.matmul(q, k[:, :, s:e].transpose(-1, -2)) * scale  # (B, h, T, blk)
        visible = k_pos[:, None, s:e] <= q_pos[:, :, None]  # (B, T, blk)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(scores - safe[..., None])
        corr = torch.exp(torch.where(torch.isfinite(m), m - safe, torch.full_like(m, float("-inf"))))
        denom = denom * corr + p.sum(-1)
        acc = acc * corr[..., None] + torch.matmul(p, v[:, :, s:e])
        m = m_new
    return acc / denom[..., None]


def make_mixer(code: str, cfg: HyenaGLTConfig, spec: ModelSpec = LOCAL) -> nn.Module:
    # GPT-2 style: residual-branch outputs scaled down with depth.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    if code == "*":
        return CausalSelfAttention(cfg, out_std, spec)
    return HyenaOperator(code, cfg, out_std, spec)
