"""Deterministic, layout-independent parameter initialisation.

Every parameter carries its own init rule (`param.init_fn(generator, full_shape)`) and is
drawn from a generator seeded by (config.seed, the parameter's canonical name). The value
of a parameter therefore depends on neither construction order nor on how a parallel
layout splits the model: a tensor-parallel layer draws the *full* tensor with the same
generator and keeps its slice, so every layout starts from exactly the same weights.

Parameters also carry `no_weight_decay` (filters, conv weights, norms, biases) so the
optimizer can group them without name matching. (megatron-core tags its parameters the
same way, with attributes such as `tensor_model_parallel`.)
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
from torch import nn

InitFn = Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]


def normal(std: float) -> InitFn:
    return lambda gen, shape: torch.randn(shape, generator=gen, dtype=torch.float64) * std


def uniform(low: float, high: float) -> InitFn:
    return lambda gen, shape: low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def constant(value: float) -> InitFn:
    return lambda gen, shape: torch.full(shape, float(value), dtype=torch.float64)


def fan_in_uniform(fan_in: int) -> InitFn:
    """PyTorch's default conv/linear rule, bound 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return uniform(-bound, bound)


def new_param(shape: tuple[int, ...], init: InitFn, no_weight_decay: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    tag(p, init, no_weight_decay)
    return p


def tag(p: nn.Parameter, init: InitFn, no_weight_decay: bool = False) -> nn.Parameter:
    p.init_fn = init
    p.no_weight_decay = no_weight_decay
    return p


def param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init(p: nn.Parameter, name: str, seed: int, full_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The full (unsharded) initial value of the parameter called `name`."""
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    return p.init_fn(gen, tuple(full_shape or p.shape))


@torch.no_grad()
def initialize(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Initialise every parameter of `module` from (seed, prefix + its name)."""
    for name, p in module.named_parameters():
        if not hasattr(p, "init_fn"):
            raise TypeError(f"parameter {prefix}{name} has no init rule; create it with params.new_param/tag")
        p.copy_(full_init(p, prefix + name, seed).to(p.dtype))


def linear(d_in: int, d_out: int, std: float, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    tag(layer.weight, normal(std))
    if bias:
        tag(layer.bias, constant(0.0), no_weight_decay=True)
    return layer
