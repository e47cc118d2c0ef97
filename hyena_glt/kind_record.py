"""The layer-kind record and the table it is registered in (read them through hyena_glt.kinds).

This module is the bottom of the registry: it imports nothing of the model, so the module
that implements a kind (operators.py for S, D, H and *, a plug-in for its own) can register
it here while hyena_glt.kinds, which every reader uses, imports those modules first. The
split exists only to keep the import graph acyclic; `hyena_glt.kinds` re-exports every name.

What each field means, and who reads it, is documented on `LayerKind`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the record never builds anything itself
    from torch import nn

    from .config import HyenaGLTConfig
    from .spec import ModelSpec

# '|' in a pattern marks a pipeline-stage boundary; it is never a layer kind.
STAGE_SEPARATOR = "|"

# How a kind's mixer reads across context-parallel (zigzag) chunks; megatron_adapters/
# context_parallel.py implements each, behind the spec's short_conv / long_conv / attention.
CP_HALO = "halo"  # short causal convolutions only: each chunk gets the `halo` positions before it
CP_FIR = "fir"  # + a finite long filter (spec.long_conv): a halo when a chunk covers its taps, else all-to-all
CP_MODAL = "modal"  # + a modal long filter (spec.long_conv): chunk end states gathered and scanned, or all-to-all
CP_KV_GATHER = "kv-gather"  # attention (spec.attention): K/V all-gathered over CP, masked by global position
CP_PATHS = (CP_HALO, CP_FIR, CP_MODAL, CP_KV_GATHER)
CP_LONG_CONV_KINDS = (CP_FIR, CP_MODAL)  # the paths whose filters go through spec.long_conv

# `parallel.cp_long_conv`: how the long convolutions (CP_LONG_CONV_KINDS) cross CP ranks.
CP_LONG_CONV_STATE = "state"  # halo (FIR) or modal state (modal): O(halo + state) traffic
CP_LONG_CONV_ALL2ALL = "all2all"  # sequence-sharded -> channel-sharded and back: O(L) traffic, any filter
CP_LONG_CONV_PATHS = (CP_LONG_CONV_STATE, CP_LONG_CONV_ALL2ALL)

# How an inference-cache entry is laid out (hyena_glt/cache.py stacks rows by it).
CACHE_RECURRENT = "recurrent"  # fixed-size tensors per row (FIR histories, modal states): rows concatenate
CACHE_KV = "kv"  # keys/values per position (`k`, `v`, `pos`, `n`): rows of different lengths are padded
CACHE_LAYOUTS = (CACHE_RECURRENT, CACHE_KV)

# The terms a kind's FLOPs are reported in (bench gpu, docs/performance.md).
FLOP_TERMS = ("matmul", "attention", "conv")


def no_halo(cfg: HyenaGLTConfig) -> int:
    return 0


# What a kind's operation sends across context-parallel ranks (`CPExchange.op`).
CP_SEND_HALO = "halo"  # spec.short_conv: each zigzag chunk receives the `taps` positions before it
CP_SEND_LONG_CONV = "long_conv"  # spec.long_conv: a FIR filter of `taps` taps or a modal one of order `state`
CP_SEND_KV = "kv"  # spec.attention: `channels` values per token (K and V) gathered from every CP rank
CP_SENDS = (CP_SEND_HALO, CP_SEND_LONG_CONV, CP_SEND_KV)


@dataclass(frozen=True)
class CPExchange:
    """One context-parallel exchange a block of a kind runs per forward (the backward sends
    the same amount back): the planner's traffic model (launch/plan/cost.py) computes its bytes,
    which equal what megatron_adapters/context_parallel.py counts (tests/plan)."""

    op: str  # CP_SENDS
    channels: int  # channels of the whole model (tensor parallelism splits them)
    taps: int = 0  # halo: positions a chunk needs before it; long_conv: a FIR filter's taps (0 when modal)
    state: int = 0  # long_conv: a modal filter's order (values per channel of a chunk's end state)

    def __post_init__(self):
        if self.op not in CP_SENDS:
            raise ValueError(f"CPExchange: op={self.op!r} must be one of {', '.join(CP_SENDS)}")


@dataclass(frozen=True, eq=False)  # identity: a kind is one registered object
class LayerKind:
    """Everything the system asks of one layer kind. Each callable takes the model config.

    code         the pattern character (one character, not '|' or whitespace)
    name         a short name (`hyena_se`, `attention`, ...)
    build        (config, out_std, spec) -> the mixer module of one block (layers.Block). The
                 mixer computes `forward(x, position_ids)` with the spec's linear layers,
                 convolutions and attention only, so it runs on one device and in every
                 layout; `out_std` is the init std of its output projection (scaled with depth).
                 For cached inference it also has `extend(x, position_ids, state) -> (y, state)`
                 (single device, batch-first; state: the cache entry, None at the start).
    flops        (config, seq_len) -> forward FLOPs per token of the mixer, by term of
                 FLOP_TERMS, by the textbook algorithm (bench gpu's MFU; the MLP and output
                 layer are the model's, counted there)
    activations  (config, seq_len, tp) -> values per token the mixer keeps for backward on
                 one tensor-parallel rank, as autograd really keeps them (measured: see
                 docs/planning.md#activations; train --dry-run and plan read it; norms,
                 residuals and MLP are the block's). seq_len is the whole context; what CP
                 gathers is the planner's, from cp_sends
    cache        the inference-cache layout of its entry (CACHE_LAYOUTS)
    cache_state  (config, length) -> the shape, per sequence, of every tensor its cache entry
                 holds after `length` positions (KV caches: without the capacity slack)
    tp_split     mixer parameter name (relative to the mixer, e.g. 'in_proj.weight') -> the
                 dim tensor parallelism splits into contiguous parts; unnamed parameters are
                 replicated. Names are shared across kinds: a name splits the same way in
                 every kind that has it (register_kind refuses a contradiction)
    cp           its context-parallel path (CP_PATHS)
    halo         (config) -> positions before its own that its short convolutions read: the
                 shortest context-parallel chunk it allows is this long
    cp_sends     (config) -> the CPExchange records of one block's forward (its halos, long
                 convolution, K/V gather): the planner's CP traffic; None: not declared (the
                 planner then counts no CP traffic for the kind and says so)
    evo2         the Vortex / Evo 2 block type it is (`hcs`, `hcm`, `hcl`, `attn`), or None
                 when Evo 2 has none (such a model is not exportable)
    """

    code: str
    name: str
    build: Callable[[HyenaGLTConfig, float, ModelSpec], nn.Module]
    flops: Callable[[HyenaGLTConfig, int], Mapping[str, float]]
    activations: Callable[[HyenaGLTConfig, int, int], float]
    cache: str
    cache_state: Callable[[HyenaGLTConfig, int], Mapping[str, tuple[int, ...]]]
    tp_split: Mapping[str, int]
    cp: str
    halo: Callable[[HyenaGLTConfig], int] = no_halo
    cp_sends: Callable[[HyenaGLTConfig], tuple[CPExchange, ...]] | None = None
    evo2: str | None = None
    description: str = ""

    def __post_init__(self):
        where = f"layer kind {self.code!r}"
        if not isinstance(self.code, str) or len(self.code) != 1 or self.code == STAGE_SEPARATOR or self.code.isspace():
            raise ValueError(f"{where}: code must be one character other than {STAGE_SEPARATOR!r} and whitespace")
        if self.cp not in CP_PATHS:
            raise ValueError(f"{where}: cp={self.cp!r} must be one of {', '.join(CP_PATHS)}")
        if self.cache not in CACHE_LAYOUTS:
            raise ValueError(f"{where}: cache={self.cache!r} must be one of {', '.join(CACHE_LAYOUTS)}")
        bad = {k: v for k, v in self.tp_split.items() if not (isinstance(v, int) and v >= 0)}
        if bad:
            raise ValueError(f"{where}: tp_split dims must be non-negative integers, got {bad}")
        object.__setattr__(self, "tp_split", MappingProxyType(dict(self.tp_split)))

    @property
    def origin(self) -> str:
        """The module that declared the kind (for error messages)."""
        return getattr(self.build, "__module__", None) or "?"


# code -> kind, in registration order. Written only by register_kind; read through hyena_glt.kinds.
TABLE: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind; its code is then a valid pattern character everywhere. ValueError
    (one line) for a taken code or Evo 2 block type, or a TP rule another kind contradicts."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_kind: expected a LayerKind, got {type(kind).__name__}")
    if kind.code in TABLE:
        have = TABLE[kind.code]
        raise ValueError(f"layer kind {kind.code!r} ({kind.name}, from {kind.origin}) is already registered as "
                         f"{have.name} (from {have.origin}); pick another code")
    for other in TABLE.values():
        clash = {n: (d, other.tp_split[n]) for n, d in kind.tp_split.items() if n in other.tp_split and other.tp_split[n] != d}
        if clash:
            name, (mine, theirs) = next(iter(clash.items()))
            raise ValueError(f"layer kind {kind.code!r}: tp_split splits mixer parameter {name!r} on dim {mine}, but "
                             f"kind {other.code!r} splits it on dim {theirs}; rename the parameter")
        if kind.evo2 is not None and kind.evo2 == other.evo2:
            raise ValueError(f"layer kind {kind.code!r}: Evo 2 block type {kind.evo2!r} is already kind {other.code!r}")
    TABLE[kind.code] = kind
    return kind


# ---------------------------------------------------------------------------- counting helpers
# The textbook counts the built-in declarations use (and a plug-in may): they count the
# algorithm, not whichever kernel runs it (kernels change; the count must not).


def fft_flops(n: int) -> float:
    """A real FFT (or inverse) of size n: half a complex one's 5 n log2 n."""
    return 2.5 * n * math.log2(n)


def direct_conv_flops(channels: int, taps: int) -> float:
    """Forward FLOPs per token of a causal depthwise convolution with explicit taps, as a
    direct FIR: a multiply and an add per tap and channel."""
    return 2.0 * channels * taps


def fft_conv_flops(channels: int, seq_len: int) -> float:
    """Forward FLOPs per token of a causal depthwise convolution with a full-length filter,
    as an FFT convolution of size 2L: transform z and h, 6 per complex product, transform back."""
    n = 2 * seq_len
    return channels * (3 * fft_flops(n) + 6 * (n // 2 + 1)) / seq_len
