"""The `H` convolution in its modal (state-space) form: blocks and a carried state.

With h[t] = sum_o R_o exp(-rate_o t), the causal convolution y = h * z splits at any cut
into what the block's own inputs give (the first T taps, exactly) and what everything
before the block gives through one number per channel and pole, the state

    s_o = sum_j exp(-rate_o j) z[cut - 1 - j]          (every earlier position)
    y[cut + t] += sum_o R_o exp(-rate_o (t + 1)) s_o    (t = 0 .. T-1)
    s_o <- exp(-rate_o T) s_o + sum_j exp(-rate_o (T - 1 - j)) z[cut + j]

`modal_conv` cuts the sequence into blocks of T positions: a T x T Toeplitz product per
block (a batched GEMM), the block-end states as a small product, and the recurrence over
blocks as a scan that only ever multiplies by exp(-rate * positive), so nothing
overflows. It is exact up to rounding for every L, and never evaluates the filter beyond T
taps, which is where the FFT path spends most of its time (C x order x L exponentials).

The same state is what the inference cache keeps (`ModalFilter.extend`), and what context
parallelism passes between ranks instead of the activations (megatron_adapters).
Autograd differentiates every step; what it saves is O(C order T + B C L / T * order).
"""

from __future__ import annotations

import torch

from .fftconv import toeplitz

# Block length of the blocked form. Its cost per position is ~T (Toeplitz) + ~2 x order
# (state in, state out): measured fwd+bwd on CPU (C=256, order 16), 64 beat 32 and 128.
BLOCK = 64


# Below this length the FFT path is faster. Measured fwd+bwd on CPU (C=256, order 16, batch
# 4; median of 15): FFT 5.9 vs blocked 13.4 ms at L=128, even at 256, blocked 2.4x faster at
# 512 and 7-20x at 4K-64K (`bench ops`), because the FFT path must first evaluate C x order
# x L exponentials and transform at size >= 2L. Not yet measured on a GPU: `bench ops` there
# times both paths and prints which one this rule picks.
BLOCKED_MIN_LEN = 256


def modal_path(length: int) -> str:
    """`blocked` or `fft`: the faster exact path for an `H` convolution of this length."""
    return "blocked" if length >= BLOCKED_MIN_LEN else "fft"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # never evaluate decays in bf16


def modal_kernels(residues: torch.Tensor, log_rates: torch.Tensor, T: int):
    """For blocks of T: taps (C, T), read (C, O, T): state -> output t, write (C, O, T):
    input j -> block-end state, and the block decay exp(-rate T) (C, O)."""
    rates = log_rates.exp()
    t = torch.arange(T, device=rates.device, dtype=rates.dtype)
    e = torch.exp(-rates[..., None] * t)  # (C, O, T): decay after t steps
    taps = (residues[..., None] * e).sum(1)
    step = torch.exp(-rates)[..., None]
    read = residues[..., None] * e * step
    write = e.flip(-1)
    return taps, read, write, (e[..., -1:] * step).squeeze(-1)


def modal_carry(state: torch.Tensor, residues: torch.Tensor, log_rates: torch.Tensor, T: int,
                block: int = BLOCK) -> torch.Tensor:
    """What a past summarised by `state` (B, C, O) adds to the next T outputs: (B, C, T).
    By blocks, like modal_conv: the state decayed to each block's start, then the block's
    (C, O, block) read-out, so no C x O x T table of exponentials is ever built."""
    dtype = _compute_dtype(state.dtype)
    with torch.autocast(state.device.type, enabled=False):
        R, a = residues.to(dtype), log_rates.to(dtype)
        n = -(-T // block)
        _, read, _, _ = modal_kernels(R, a, min(block, T))
        starts = torch.arange(n, device=state.device, dtype=dtype) * min(block, T)
        decayed = torch.exp(-a.exp()[:, None, :] * starts[:, None]) * state.to(dtype)[:, :, None]  # (B, C, n, O)
        y = torch.einsum("cot,bcno->bcnt", read, decayed)
        return y.reshape(*state.shape[:2], -1)[..., :T]


class _StateScan(torch.autograd.Function):
    """S_k = decay * S_{k-1} + local_k over blocks, S_{-1} = 0. A loop of n small in-place
    steps: a log-depth scan through autograd moves the whole (B, C, n, O) tensor per step
    and per slice in backward, several times the cost of the convolution itself."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        S = local.movedim(-2, 0).clone(memory_format=torch.contiguous_format)  # (n, ..., C, O): contiguous slabs
        for k in range(1, S.shape[0]):
            S[k].addcmul_(decay, S[k - 1])
        ctx.save_for_backward(S, decay)
        return S.movedim(0, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        S, decay = ctx.saved_tensors
        G = grad.movedim(-2, 0).clone(memory_format=torch.contiguous_format)  # dL/dlocal_k = G_k = grad_k + decay * G_{k+1}
        for k in range(G.shape[0] - 2, -1, -1):
            G[k].addcmul_(decay, G[k + 1])
        g_decay = (G[1:] * S[:-1]).reshape(-1, *decay.shape).sum(0) if G.shape[0] > 1 else torch.zeros_like(decay)
        return G.movedim(0, -2), g_decay


def state_scan(local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Inclusive scan S_k = decay * S_{k-1} + local_k along dim -2 of local (..., C, n, O),
    S_{-1} = 0; decay (C, O)."""
    return _StateScan.apply(local, decay)


def modal_conv(z: torch.Tensor, residues: torch.Tensor, log_rates: torch.Tensor,
               state: torch.Tensor | None = None, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """y = h * z (no skip) for z (B, C, L), continuing the past in `state` (B, C, O; None:
    the sequence starts here). Returns (y, the state after the last position). Computed in
    at least fp32 also under autocast: the state carries the whole past, as the FFT path's
    transform does, and neither survives bf16."""
    with torch.autocast(z.device.type, enabled=False):
        return _modal_conv(z, residues, log_rates, state, block)


def _modal_conv(z, residues, log_rates, state, block):
    B, C, L = z.shape
    dtype = _compute_dtype(z.dtype)
    R, a = residues.to(dtype), log_rates.to(dtype)
    zd = z.to(dtype)
    if L == 1 and state is not None:  # one decoding step: the recurrence itself, every pole at once
        new = torch.exp(-a.exp()) * state.to(dtype) + zd
        return (new * R).sum(-1, keepdim=True).to(z.dtype), new
    T = min(block, L)
    m = L - L % T
    if m < L:  # the ragged tail is one more, shorter block, started from the main part's state
        y, s = _modal_conv(z[..., :m], residues, log_rates, state, block)
        y_tail, s = _modal_conv(z[..., m:], residues, log_rates, s, L - m)
        return torch.cat([y, y_tail], dim=-1), s
    n = L // T
    taps, read, write, decay = modal_kernels(R, a, T)
    zb = zd.reshape(B, C, n, T)
    y = torch.einsum("ctj,bcnj->bcnt", toeplitz(taps, T, T), zb)
    S = state_scan(torch.einsum("coj,bcnj->bcno", write, zb), decay)  # state after each block
    if state is not None:  # the past's state, decayed over 1..n blocks
        powers = torch.arange(1, n + 1, device=z.device, dtype=dtype)
        S = S + torch.exp(-a.exp()[:, None, :] * T * powers[:, None]) * state.to(dtype)[:, :, None]
    first = state.to(dtype)[:, :, None] if state is not None else S.new_zeros(B, C, 1, S.shape[-1])
    y = y + torch.einsum("cot,bcno->bcnt", read, torch.cat([first, S[:, :, :-1]], dim=2))
    return y.reshape(B, C, L).to(z.dtype), S[:, :, -1]
