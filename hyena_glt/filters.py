"""The convolution filters of the striped-Hyena operators.

Each filter module owns its parameters and produces the filter taps `h` (channels, taps)
for a sequence length; the long ones (`D`, `H`) also convolve (`conv`) by their fastest
exact path. The operator reaches them through its spec's convolution backend (local, or
context-parallel). Every tensor is laid out channel-first, and a filter
built with `tp > 1` holds the contiguous channel slice `tp_rank` of it (whole groups).

What the Hyena operator asks of its filter, whatever the kind: `convolve(z, spec)` (the
layer's causal convolution with skip, through the spec's backend: `spec.short_conv` for a
short filter, `spec.long_conv` for a long one, which context parallelism routes by the
kind's declared path), `extend(z, state)` (inference: the convolution without skip, continued
from a cache state) and `cache_key` (the name of that state in the cache entry).

* `ShortConv`: explicit taps per channel (the featurizer over x1/x2/v, length 3).
* `GroupedShortFilter` (`S`): explicit length-7 taps shared by each channel group.
* `DecayedMediumFilter` (`D`): explicit taps per group times a fixed per-channel
  exponential decay exp(-r_c t), r log-spaced over the *global* channel index.
* `ModalFilter` (`H`): h[c, t] = sum_o R[c, o] exp(-exp(a[c, o]) t); the parameters do
  not depend on the sequence length, so h is evaluated for any L (context extension
  needs no checkpoint surgery). It convolves in modal form (modal.py), never
  materialising h beyond one block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import params
from .fftconv import causal_conv, fir_extend
from .modal import modal_conv, modal_path


def _channel_slice(t: torch.Tensor, channels: slice | None) -> torch.Tensor:
    return t if channels is None else t[channels]


class ShortConv(nn.Module):
    """Depthwise causal conv with explicit taps per channel, no skip (the featurizer)."""

    def __init__(self, channels: int, taps: int):
        super().__init__()
        self.weight = params.new_param((channels, taps), params.fan_in_uniform(taps), no_weight_decay=True)

    def filter(self, length: int | None = None, channels: slice | None = None) -> torch.Tensor:
        return _channel_slice(self.weight, channels)


class _FiniteFilter(nn.Module):
    """A filter with finite taps: its inference state is the last taps-1 inputs (a FIR history)."""

    cache_key = "fir"

    def extend(self, z: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return fir_extend(z, self.filter(), state)


class GroupedShortFilter(_FiniteFilter):
    """`S`: one explicit short filter per channel group, plus a per-channel skip."""

    def __init__(self, d_model: int, groups: int, taps: int, tp: int = 1, skip: bool = True):
        super().__init__()
        self.group_size = d_model // groups
        self.weight = params.new_param((groups // tp, taps), params.fan_in_uniform(taps), no_weight_decay=True)
        # Evo 2's SE filter has no skip term.
        self.skip = params.new_param((d_model // tp,), params.constant(1.0), no_weight_decay=True) if skip else None

    def filter(self, length: int | None = None, channels: slice | None = None) -> torch.Tensor:
        return _channel_slice(self.weight.repeat_interleave(self.group_size, dim=0), channels)

    def convolve(self, z: torch.Tensor, spec) -> torch.Tensor:
        return spec.short_conv(z, self.filter(), self.skip)


def decay_rates(d_model: int, r_min: float, r_max: float) -> torch.Tensor:
    """Per-channel decay rates, log-spaced over all d_model channels (sliced later under TP)."""
    return torch.logspace(math.log10(r_min), math.log10(r_max), d_model, dtype=torch.float64).float()


class DecayedMediumFilter(_FiniteFilter):
    """`D`: explicit taps per group times a fixed exponential decay per channel."""

    def __init__(self, d_model: int, groups: int, taps: int, r_min: float, r_max: float, tp: int = 1, tp_rank: int = 0,
                 decay: bool = True):
        super().__init__()
        self.group_size, self.decay = d_model // groups, decay  # decay False: raw taps (Evo 2 at inference)
        d_local = d_model // tp
        self.weight = params.new_param((groups // tp, taps), params.normal(1.0 / math.sqrt(taps)), no_weight_decay=True)
        self.skip = params.new_param((d_local,), params.constant(1.0), no_weight_decay=True)
        # Fixed, not learned; a buffer so it moves with the module but never enters the optimizer.
        # Rates run over the global channel index: channel c decays the same in every layout.
        rates = decay_rates(d_model, r_min, r_max)[tp_rank * d_local : (tp_rank + 1) * d_local].clone()
        self.register_buffer("rates", rates, persistent=False)

    def filter(self, length: int | None = None, channels: slice | None = None) -> torch.Tensor:
        taps = self.weight.shape[1]
        t = torch.arange(taps, device=self.weight.device, dtype=torch.float32)
        # Slice before the product: a context-parallel rank evaluates only its own channels.
        w = _channel_slice(self.weight.repeat_interleave(self.group_size, dim=0), channels)
        if not self.decay:
            return w
        decay = torch.exp(-_channel_slice(self.rates.float(), channels)[:, None] * t)
        return w * decay.to(w.dtype)

    def conv(self, z: torch.Tensor, channels: slice | None = None) -> torch.Tensor:
        """The layer's causal convolution (with skip) of z (B, C, L) over its own channels."""
        return causal_conv(z, self.filter(channels=channels), _channel_slice(self.skip, channels))

    def convolve(self, z: torch.Tensor, spec) -> torch.Tensor:
        return spec.long_conv(z, self)


class _ModalTaps(torch.autograd.Function):
    """h[c, t] = sum_o R[c, o] exp(-rate[c, o] t), one pole at a time.

    Autograd through the plain expression would keep a (C, order, L) tensor alive for
    backward (1 GiB at d_model 256, order 16, L 64K); recomputing each pole's decay in
    backward keeps memory at O(C * L).
    """

    @staticmethod
    def forward(ctx, residues: torch.Tensor, log_rates: torch.Tensor, length: int) -> torch.Tensor:
        dtype = torch.promote_types(residues.dtype, torch.float32)  # never evaluate decays in bf16
        t = torch.arange(length, device=residues.device, dtype=dtype)
        rates = log_rates.to(dtype).exp()
        h = torch.zeros(residues.shape[0], length, device=residues.device, dtype=dtype)
        for o in range(residues.shape[1]):
            h.addcmul_(residues[:, o : o + 1].to(dtype), torch.exp(-rates[:, o : o + 1] * t))
        ctx.save_for_backward(residues, log_rates)
        ctx.length = length
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        residues, log_rates = ctx.saved_tensors
        dtype = torch.promote_types(residues.dtype, torch.float32)
        t = torch.arange(ctx.length, device=residues.device, dtype=dtype)
        rates = log_rates.to(dtype).exp()
        grad_h = grad_h.to(dtype)
        g_res = torch.empty_like(residues, dtype=dtype)
        g_log = torch.empty_like(log_rates, dtype=dtype)
        for o in range(residues.shape[1]):
            e = torch.exp(-rates[:, o : o + 1] * t)  # (C, L)
            ge = (grad_h * e).sum(-1)
            g_res[:, o] = ge
            # d/da [R exp(-e^a t)] = -R e^a t exp(-e^a t)
            g_log[:, o] = -residues[:, o].to(dtype) * rates[:, o] * (grad_h * e * t).sum(-1)
        return g_res.to(residues.dtype), g_log.to(log_rates.dtype), None


class ModalFilter(nn.Module):
    """`H`: long implicit filter in modal form, `order` real decaying modes per channel."""

    cache_key = "modal"

    def __init__(self, d_model: int, order: int, max_seq_len: int, tp: int = 1):
        super().__init__()
        # Time constants 1/rate spread log-uniformly from 1 position to the full context.
        lo, hi = math.log(1.0 / max_seq_len), 0.0
        d = d_model // tp
        self.residues = params.new_param((d, order), params.normal(1.0 / math.sqrt(order)), no_weight_decay=True)
        self.log_rates = params.new_param((d, order), params.uniform(lo, hi), no_weight_decay=True)
        self.skip = params.new_param((d,), params.constant(1.0), no_weight_decay=True)

    def filter(self, length: int, channels: slice | None = None) -> torch.Tensor:
        return _ModalTaps.apply(_channel_slice(self.residues, channels), _channel_slice(self.log_rates, channels), length)

    def conv(self, z: torch.Tensor, channels: slice | None = None) -> torch.Tensor:
        """The layer's causal convolution (with skip) of z (B, C, L) over its own channels,
        through the blocked modal form or the FFT, whichever `modal_path` picks."""
        skip = _channel_slice(self.skip, channels)
        if modal_path(z.shape[-1]) == "fft":
            return causal_conv(z, self.filter(z.shape[-1], channels), skip)
        y, _ = modal_conv(z, _channel_slice(self.residues, channels), _channel_slice(self.log_rates, channels))
        return y + skip.to(z.dtype)[:, None] * z

    def convolve(self, z: torch.Tensor, spec) -> torch.Tensor:
        return spec.long_conv(z, self)

    @torch.no_grad()
    def extend(self, z: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal convolution (without skip) of z (B, C, T), continuing a sequence whose
        past is summarised by `state` (B, C, order; None: nothing before); returns the new
        state. The modal form (modal.py): exact, O(C order) per new position."""
        return modal_conv(z, self.residues, self.log_rates, state)
