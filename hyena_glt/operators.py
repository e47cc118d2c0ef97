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

The end of the file registers the four built-in layer kinds (hyena_glt/kinds.py): for each,
how its mixer is built and what the rest of the system asks of it (FLOPs, activation and
cache memory, tensor- and context-parallel rules, its Evo 2 block type).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .fftconv import fir_extend
from .filters import DecayedMediumFilter, GroupedShortFilter, ModalFilter, ShortConv
from .kind_record import (
    CACHE_KV,
    CACHE_RECURRENT,
    CP_FIR,
    CP_HALO,
    CP_KV_GATHER,
    CP_MODAL,
    CP_SEND_HALO,
    CP_SEND_KV,
    CP_SEND_LONG_CONV,
    TABLE,
    CPExchange,
    LayerKind,
    direct_conv_flops,
    fft_conv_flops,
    register_kind,
)
from .spec import LOCAL, ModelSpec

if TYPE_CHECKING:  # hyena_glt.config imports the registry, which imports this module
    from .config import HyenaGLTConfig

# Inference (`extend`): single device, batch-first. Every mixer continues a sequence from its
# cache entry (hyena_glt/cache.py) and returns the new one; `position_ids` (B, T) are global.

PAD_POSITION = 1 << 62  # a padded key: later than every query (exact as a float, for F.pad)


def split_interleaved(u: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3C, L) in (group, channel, x1|x2|v) order -> three (B, C, L) tensors."""
    B, C3, L = u.shape
    u = u.view(B, groups, C3 // (3 * groups), 3, L)
    return tuple(u[:, :, :, k].reshape(B, C3 // 3, L) for k in range(3))


def short_filter(cfg: HyenaGLTConfig, spec: ModelSpec) -> nn.Module:
    return GroupedShortFilter(cfg.d_model, cfg.num_filter_groups, cfg.short_filter_len, spec.tp, cfg.short_filter_skip)


def medium_filter(cfg: HyenaGLTConfig, spec: ModelSpec) -> nn.Module:
    return DecayedMediumFilter(cfg.d_model, cfg.num_filter_groups, cfg.medium_filter_len, cfg.medium_decay_min,
                               cfg.medium_decay_max, spec.tp, spec.tp_rank, cfg.medium_decay)


def modal_filter(cfg: HyenaGLTConfig, spec: ModelSpec) -> nn.Module:
    return ModalFilter(cfg.d_model, cfg.modal_order, cfg.max_seq_len, spec.tp)


# The filter of each built-in Hyena kind; the kinds themselves are registered at the end of the file.
HYENA_FILTERS: dict[str, Callable[[HyenaGLTConfig, ModelSpec], nn.Module]] = {
    "S": short_filter, "D": medium_filter, "H": modal_filter}


def make_filter(code: str, cfg: HyenaGLTConfig, spec: ModelSpec = LOCAL) -> nn.Module:
    """The S, D or H filter of this rank's channels (whole groups)."""
    if code not in HYENA_FILTERS:
        raise ValueError(f"no Hyena filter for layer code {code!r}")
    spec.local(cfg.num_filter_groups, "num_filter_groups")  # whole groups per rank, or a clear error
    return HYENA_FILTERS[code](cfg, spec)


class HyenaOperator(nn.Module):
    """The Hyena operator of layer kind `code`. Its filter (`make_filter`, or `filter_factory`
    for a kind of a plug-in) decides how z is convolved (`convolve`) and what its cache
    entry keeps (`extend`, under `cache_key`); the operator never branches on the kind."""

    def __init__(self, code: str, cfg: HyenaGLTConfig, out_std: float, spec: ModelSpec = LOCAL,
                 filter_factory: Callable[[HyenaGLTConfig, ModelSpec], nn.Module] | None = None):
        super().__init__()
        self.code, self.spec = code, spec
        self.groups = spec.local(cfg.num_filter_groups, "num_filter_groups")  # split_interleaved sees local groups
        self.in_proj = spec.column_linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.featurizer = ShortConv(3 * cfg.d_model // spec.tp, cfg.featurizer_len)
        self.filter = filter_factory(cfg, spec) if filter_factory else make_filter(code, cfg, spec)
        # Context parallelism picks a long filter's path by the kind's declaration (kinds.LayerKind.cp).
        self.filter.code = code
        self.out_proj = spec.row_linear(cfg.d_model, cfg.d_model, out_std, bias=cfg.mixer_out_bias)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        u = spec.short_conv(spec.to_channels(self.in_proj(x)), self.featurizer.weight)
        x1, x2, v = split_interleaved(u, self.groups)
        z = self.filter.convolve(x2 * v, spec)
        return self.out_proj(spec.from_channels(x1 * z))

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        state = state or {}
        u, feat = fir_extend(self.in_proj(x).transpose(1, 2), self.featurizer.weight, state.get("feat"))
        x1, x2, v = split_interleaved(u, self.groups)
        z = x2 * v
        key = self.filter.cache_key
        y, filt_state = self.filter.extend(z, state.get(key))
        if self.filter.skip is not None:
            y = y + self.filter.skip.to(z.dtype)[:, None] * z
        return self.out_proj((x1 * y).transpose(1, 2)), {"feat": feat, key: filt_state}


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
        """Attention of the chunk x (B, T, D) at global positions `position_ids` (B, T) over the
        cached keys and its own; returns the output and the cache entry with the chunk's K/V
        appended (stored in the entry's dtype: `InferenceCache.empty(kv_dtype=...)`).

        Streaming (every row's cached keys precede its chunk, positions increasing): the
        cached prefix needs no mask and the chunk sees itself causally, so the two parts run
        through PyTorch's fused kernels apart and are combined by their log-sum-exp
        (`prefix_causal_attention`). Any other layout (a left-padded batch of rows of
        different lengths, `InferenceCache.stack`) masks keys by position (`blocked_attention`)."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = (rope(qkv[0], position_ids, self.rope_base, self.rope_scale),
                   rope(qkv[1], position_ids, self.rope_base, self.rope_scale), qkv[2])
        n = state["n"] if state is not None else 0
        increasing = T == 1 or bool((position_ids[:, 1:] > position_ids[:, :-1]).all())
        if n == 0 and increasing:  # nothing cached: the forward's own kernel (as the one-pass forward)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            new = ({"k": k, "v": v, "pos": position_ids.expand(B, T).contiguous(), "n": T} if state is None
                   else _append_kv(state, k, v, position_ids))
        elif increasing and bool((state["pos"][:, :n].amax(1) < position_ids[:, 0]).all()):
            if T == 1 and state["k"].dtype == q.dtype:  # a decoding step sees every key: one fused call, no mask
                new = _append_kv(state, k, v, position_ids)
                y = torch.nn.functional.scaled_dot_product_attention(q, new["k"][:, :, : n + 1], new["v"][:, :, : n + 1])
            else:
                y = prefix_causal_attention(q, k, v, state["k"][:, :, :n], state["v"][:, :, :n])
                new = _append_kv(state, k, v, position_ids)
        else:
            new = _append_kv(state, k, v, position_ids)
            n = new["n"]
            y = blocked_attention(q, new["k"][:, :, :n].to(q.dtype), new["v"][:, :, :n].to(q.dtype), position_ids,
                                  new["pos"][:, :n])
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1)), new


def _append_kv(state: dict | None, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> dict:
    """Write new keys/values after the first `n` of the cache (cast to the cache's dtype),
    growing its capacity by doubling (amortised O(1) per token, not a copy of the whole cache
    every step; a cache made with the sequence's length as capacity never grows). Unused
    slots hold PAD_POSITION, so attention never sees them."""
    B, h, T, hd = k.shape
    if state is None:
        state = {"k": k.new_zeros(B, h, 0, hd), "v": v.new_zeros(B, h, 0, hd),
                 "pos": pos.new_full((B, 0), PAD_POSITION), "n": 0}
    n, cap = state["n"], state["k"].shape[2]
    if n + T > cap:
        cap = max(2 * cap, n + T, 256)
        old = state
        state = {"k": old["k"].new_zeros(B, h, cap, hd), "v": old["v"].new_zeros(B, h, cap, hd),
                 "pos": old["pos"].new_full((B, cap), PAD_POSITION), "n": n}
        state["k"][:, :, :n], state["v"][:, :, :n] = old["k"][:, :, :n], old["v"][:, :, :n]
        state["pos"][:, :n] = old["pos"][:, :n]
    state["k"][:, :, n : n + T] = k
    state["v"][:, :, n : n + T] = v
    state["pos"][:, n : n + T] = pos
    state["n"] = n + T
    return state


# Keys of a prefix read per fused-kernel call when the cache is stored in another dtype than
# the queries (a bf16 cache): each block is cast up on its own, so the cast copy stays small.
PREFIX_BLOCK_BYTES = 64 << 20


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
                            v_prefix: torch.Tensor) -> torch.Tensor:
    """Causal attention of a chunk (q, k, v: B, h, T, hd) that follows a prefix of keys all
    earlier than it (k_prefix, v_prefix: B, h, n, hd): every query sees the whole prefix (no
    mask) and the chunk's keys up to its own. The two parts run apart and are combined by
    their log-sum-exp (as flash-decoding splits keys):

        out = out_p * exp(lse_p - lse) + out_c * exp(lse_c - lse),  lse = logaddexp(lse_p, lse_c)

    Equal to softmax over the concatenated keys up to float rounding. A prefix stored in
    another dtype (a bf16 cache) is cast to q's dtype block by block (PREFIX_BLOCK_BYTES)."""
    out, lse = attention_with_lse(q, k, v, causal=True)
    out = out.float()
    B, h, n, hd = k_prefix.shape
    step = n if k_prefix.dtype == q.dtype else max(1024, PREFIX_BLOCK_BYTES // (2 * B * h * hd * q.element_size()))
    for s in range(0, n, step):
        kb, vb = k_prefix[:, :, s : s + step].to(q.dtype), v_prefix[:, :, s : s + step].to(q.dtype)
        out_b, lse_b = attention_with_lse(q, kb, vb, causal=False)
        total = torch.logaddexp(lse, lse_b)
        out = out * torch.exp(lse - total)[..., None] + out_b.float() * torch.exp(lse_b - total)[..., None]
        lse = total
    return out.to(q.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled-dot-product attention (B, h, T, hd) and the log-sum-exp of each query's scores
    (B, h, T, float32), from PyTorch's fused kernels: on CPU the flash kernel, on CUDA the
    memory-efficient one (fp32, fp16, bf16); `math_attention_with_lse` where neither applies.
    `causal`: query i sees keys j <= i (T == the number of keys)."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse
    if q.device.type == "cuda":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]
            return out, lse[..., : q.shape[2]].float()  # lse rows are padded to a multiple of 32
        except RuntimeError:  # a head size or dtype the kernel does not take
            pass
    return math_attention_with_lse(q, k, v, causal)


def math_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            scores_per_block: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` in plain matmuls, keys in blocks with a running softmax (any
    device and dtype; memory O(B h T block))."""
    B, h, T, _ = q.shape
    Lk = k.shape[2]
    scale = q.shape[-1] ** -0.5
    block = max(256, scores_per_block // (B * h * T))
    lse = q.new_full((B, h, T), float("-inf"), dtype=torch.float32)
    acc = q.new_zeros((B, h, T, v.shape[-1]), dtype=torch.float32)
    rows = torch.arange(T, device=q.device)[:, None]
    for s in range(0, Lk, block):
        e = min(s + block, Lk)
        scores = torch.matmul(q.float(), k[:, :, s:e].float().transpose(-1, -2)) * scale  # (B, h, T, blk)
        if causal:
            scores = scores.masked_fill(torch.arange(s, e, device=q.device) > rows, float("-inf"))
        lse_b = torch.logsumexp(scores, -1)
        total = torch.logaddexp(lse, lse_b)
        safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        acc = acc * torch.exp(lse - safe)[..., None] + torch.matmul(torch.exp(scores - safe[..., None]), v[:, :, s:e].float())
        lse = total
    return acc.to(q.dtype), lse


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
    """The mixer of a block of kind `code`, built by the kind's registered `build`."""
    # GPT-2 style: residual-branch outputs scaled down with depth.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    if code not in TABLE:  # config validation loaded the plug-ins; a bare code can still be wrong
        raise ValueError(f"unknown layer code {code!r}; registered: {', '.join(TABLE)}")
    return TABLE[code].build(cfg, out_std, spec)


# ---------------------------------------------------------------------------- the built-in kinds
# What the rest of the system asks of S, D, H and * (hyena_glt/kinds.py lists the readers).


def _hyena_flops(filter_flops: Callable[[HyenaGLTConfig, int], float]):
    def flops(cfg: HyenaGLTConfig, L: int) -> dict[str, float]:
        D = cfg.d_model
        return {"matmul": 2.0 * (3 * D * D + D * D),  # in_proj D -> 3D, out_proj D -> D
                "conv": direct_conv_flops(3 * D, cfg.featurizer_len) + filter_flops(cfg, L)}

    return flops


def _hyena_activations(values: float):
    # what autograd keeps of the projections, featurizer, filter and gates: `values` x
    # d_model/tp per token, measured per kind (fp32, CPU; docs/planning.md#activations)
    def activations(cfg: HyenaGLTConfig, seq_len: int, tp: int) -> float:
        return values * cfg.d_model / tp

    return activations


def _hyena_state(filter_state: Callable[[HyenaGLTConfig], dict[str, tuple[int, ...]]]):
    def state(cfg: HyenaGLTConfig, length: int) -> dict[str, tuple[int, ...]]:
        return {"feat": (3 * cfg.d_model, cfg.featurizer_len - 1), **filter_state(cfg)}

    return state


def _featurizer_halo(cfg: HyenaGLTConfig) -> int:
    return cfg.featurizer_len - 1


def _hyena_sends(filter_send: Callable[[HyenaGLTConfig], CPExchange]):
    def sends(cfg: HyenaGLTConfig) -> tuple[CPExchange, ...]:
        # the featurizer's halo (3 x d_model channels), then the filter's own exchange
        return CPExchange(CP_SEND_HALO, 3 * cfg.d_model, taps=cfg.featurizer_len - 1), filter_send(cfg)

    return sends


def _hyena_kind(code: str, name: str, description: str, filter_flops, filter_state, filter_params: tuple[str, ...],
                cp: str, halo, evo2: str, filter_send, activation_values: float) -> LayerKind:
    return LayerKind(
        code=code, name=name, description=description,
        build=lambda cfg, out_std, spec: HyenaOperator(code, cfg, out_std, spec),
        flops=_hyena_flops(filter_flops), activations=_hyena_activations(activation_values),
        cache=CACHE_RECURRENT, cache_state=_hyena_state(filter_state),
        # Rows (group, channel, x1|x2|v) and filter channels split contiguously: whole groups per rank.
        tp_split={"in_proj.weight": 0, "out_proj.weight": 1, "featurizer.weight": 0,
                  **{f"filter.{p}": 0 for p in filter_params}},
        cp=cp, halo=halo, cp_sends=_hyena_sends(filter_send), evo2=evo2)


register_kind(_hyena_kind(
    "S", "hyena_se", "Hyena operator, short explicit filter shared within channel groups",
    filter_flops=lambda cfg, L: direct_conv_flops(cfg.d_model, cfg.short_filter_len),
    filter_state=lambda cfg: {"fir": (cfg.d_model, cfg.short_filter_len - 1)},
    filter_params=("weight", "skip"), cp=CP_HALO,
    halo=lambda cfg: max(cfg.featurizer_len, cfg.short_filter_len) - 1, evo2="hcs",
    filter_send=lambda cfg: CPExchange(CP_SEND_HALO, cfg.d_model, taps=cfg.short_filter_len - 1), activation_values=12))
register_kind(_hyena_kind(
    "D", "hyena_mr", "Hyena operator, medium explicit filter times a fixed per-channel exponential decay",
    filter_flops=lambda cfg, L: direct_conv_flops(cfg.d_model, cfg.medium_filter_len),
    filter_state=lambda cfg: {"fir": (cfg.d_model, cfg.medium_filter_len - 1)},
    filter_params=("weight", "skip"), cp=CP_FIR, halo=_featurizer_halo, evo2="hcm",
    filter_send=lambda cfg: CPExchange(CP_SEND_LONG_CONV, cfg.d_model, taps=cfg.medium_filter_len),
    activation_values=14))
register_kind(_hyena_kind(
    "H", "hyena_li", "Hyena operator, long implicit (modal) filter",
    filter_flops=lambda cfg, L: fft_conv_flops(cfg.d_model, L),
    filter_state=lambda cfg: {"modal": (cfg.d_model, cfg.modal_order)},
    filter_params=("residues", "log_rates", "skip"), cp=CP_MODAL, halo=_featurizer_halo, evo2="hcl",
    filter_send=lambda cfg: CPExchange(CP_SEND_LONG_CONV, cfg.d_model, state=cfg.modal_order),
    activation_values=15.5))


def _attention_flops(cfg: HyenaGLTConfig, L: int) -> dict[str, float]:
    D = cfg.d_model
    # qkv D -> 3D and out D -> D; QK^T and AV over the (L+1)/2 keys a causal query sees on average
    return {"matmul": 2.0 * (3 * D * D + D * D), "attention": 2.0 * 2 * D * (L + 1) / 2}


def _attention_activations(cfg: HyenaGLTConfig, seq_len: int, tp: int) -> float:
    # qkv, rotated q/k, context, output and the kernel's log-sum-exp: 9 x d_model/tp per token
    # (measured: the fused kernel keeps no probabilities); K/V gathered over CP are the
    # planner's (its `kv` exchange)
    return 9 * cfg.d_model / tp


def _attention_state(cfg: HyenaGLTConfig, length: int) -> dict[str, tuple[int, ...]]:
    kv = (cfg.num_heads, length, cfg.head_dim)
    return {"k": kv, "v": kv, "pos": (length,)}


register_kind(LayerKind(
    code="*", name="attention", description="causal multi-head attention with RoPE",
    build=lambda cfg, out_std, spec: CausalSelfAttention(cfg, out_std, spec),
    flops=_attention_flops, activations=_attention_activations,
    cache=CACHE_KV, cache_state=_attention_state,
    tp_split={"qkv_proj.weight": 0, "out_proj.weight": 1},  # rows (head, q|k|v, head_dim): whole heads per rank
    cp=CP_KV_GATHER, cp_sends=lambda cfg: (CPExchange(CP_SEND_KV, 2 * cfg.d_model),), evo2="attn"))
