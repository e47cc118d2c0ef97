"""Causal depthwise convolution y[c, t] = sum_{j<=t} h[c, j] * z[c, t - j] (+ skip[c] * z[c, t]).

Three exact paths, chosen by filter and sequence length:
* direct (`F.conv1d`, depthwise) for short filters, where it is faster than any FFT;
* blocked (two Toeplitz GEMMs per block of K positions) for medium filters at long L;
* FFT, computed in at least fp32 whatever the input dtype (bf16 FFTs lose the tail of
  long filters). Taps beyond L can never reach an output < L, so the filter is cut to
  K' = min(K, L) and the transform length is the next 5-smooth n >= L + K' - 1, which is
  exactly what linear (non-circular) convolution needs: no output wraps around. With a
  full-length filter that is n >= 2L - 1; with a 128-tap filter it is about L + 128,
  half the work of the usual n = 2L.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Filters up to this many taps use the direct path. Measured fwd+bwd on CPU (C=256):
# direct wins for the 7-tap S filter at every L; for 128 taps the FFT of size ~L+K wins
# (conv1d's weight gradient is slow for long depthwise kernels).
DIRECT_MAX_TAPS = 64
# Longer finite filters (`D`, 128 taps) at long L use the two-stage blocked form: measured
# fwd+bwd on CPU (`bench ops`, C=256, 128 taps), it is about even with the FFT at 16K, 1.6x
# faster at 64K, and slower below 16K (its (C, K, 2K) Toeplitz costs the same at every L).
BLOCKED_MAX_TAPS = 256
BLOCKED_MIN_LEN = 16384


@functools.lru_cache(maxsize=None)
def fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: sizes pocketfft/cuFFT handle at full speed."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def causal_conv_direct(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z: (B, C, L); h: (C, K). Depthwise causal conv via conv1d (cross-correlation, so flip)."""
    C, K = h.shape
    weight = h.flip(-1).unsqueeze(1).to(z.dtype)
    return F.conv1d(F.pad(z, (K - 1, 0)), weight, groups=C)


def causal_conv_fft(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z: (B, C, L); h: (C, K) with any K. Exact linear convolution, first L outputs."""
    L = z.shape[-1]
    h = h[..., :L]
    n = fft_size(L + h.shape[-1] - 1)
    compute = torch.promote_types(z.dtype, torch.float32)
    z_f = torch.fft.rfft(z.to(compute), n=n)
    h_f = torch.fft.rfft(h.to(compute), n=n)
    y = torch.fft.irfft(z_f * h_f, n=n)[..., :L]
    return y.to(z.dtype)


def toeplitz(h: torch.Tensor, T: int, width: int) -> torch.Tensor:
    """(C, T, width) matrices M[c, t, j] = h[c, t + width - T - j] (zero outside 0..K-1): the
    taps that carry input j of a window of `width` positions to output t of its last T.
    Built as sliding windows of the zero-padded, flipped filter, so autograd's backward is a
    strided sum rather than a scatter over C x T x width indices."""
    q = F.pad(h, (T - 1, width - h.shape[-1])).flip(-1)
    return q.unfold(-1, width, 1).flip(-2)


def causal_conv_blocked(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z: (B, C, L); h: (C, K). Two GEMMs per block of T = K positions (StripedHyena 2's
    two-stage form): block k's outputs are Lower(h) z_k + Upper(h) z_{k-1}, written as one
    (C, T, 2T) Toeplitz product over the block and the one before it."""
    B, C, L = z.shape
    T = h.shape[-1]
    compute = torch.promote_types(z.dtype, torch.float32)
    pad = (-L) % T  # leading zeros change nothing in a causal FIR convolution
    with torch.autocast(z.device.type, enabled=False):  # at least fp32, as the FFT path: paths agree
        zb = F.pad(z.to(compute), (pad + T, 0)).reshape(B, C, -1, T)
        pairs = torch.cat([zb[:, :, :-1], zb[:, :, 1:]], dim=-1)  # (B, C, n, 2T): block before, block
        y = torch.einsum("ctj,bcnj->bcnt", toeplitz(h.to(compute), T, 2 * T), pairs).reshape(B, C, -1)
    return y[..., pad:].to(z.dtype)


def conv_path(taps: int, length: int) -> str:
    """The path `causal_conv` takes for a filter of `taps` at sequence length `length`."""
    if taps <= DIRECT_MAX_TAPS:
        return "direct"
    if taps <= BLOCKED_MAX_TAPS and length >= BLOCKED_MIN_LEN:
        return "blocked"
    return "fft"


def causal_conv(z: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on filter and sequence length; add the per-channel skip term skip[c] * z."""
    path = conv_path(h.shape[-1], z.shape[-1])
    y = {"direct": causal_conv_direct, "blocked": causal_conv_blocked, "fft": causal_conv_fft}[path](z, h)
    if skip is not None:
        y = y + skip.to(z.dtype)[:, None] * z
    return y


def causal_conv_reference(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The plain textbook FFT convolution (fp32, n = 2L), the baseline `bench ops` compares to."""
    L = z.shape[-1]
    n = 2 * L
    h = h[..., :L].float()
    y = torch.fft.irfft(torch.fft.rfft(z.float(), n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
    return y.to(z.dtype)


def fir_extend(z: torch.Tensor, h: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue a causal convolution with a finite filter h (C, K) past the inputs in
    `history` (B, C, K-1; None: the sequence starts here, zeros as in the causal padding).
    Returns (y (B, C, T), the new history). One new position costs O(C K)."""
    K = h.shape[-1]
    if history is None:
        history = z.new_zeros(*z.shape[:-1], K - 1)
    zf = torch.cat([history.to(z.dtype), z], dim=-1)
    if z.shape[-1] == 1:
        y = (zf[..., -K:] * h.flip(-1).to(z.dtype)).sum(-1, keepdim=True)
    else:
        y = causal_conv(zf, h)[..., K - 1 :]
    return y, zf[..., zf.shape[-1] - (K - 1) :]
