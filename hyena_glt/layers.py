"""Norm, gated MLP and the pre-norm residual block that wraps every mixer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .config import MLP_ACTIVATIONS, HyenaGLTConfig
from .operators import make_mixer
from .spec import LOCAL, ModelSpec


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with eps inside the square root (x * rsqrt(mean(x^2) + eps)) or,
    as Evo 2 does, outside it (x / (sqrt(mean(x^2)) + eps))."""

    def __init__(self, dim: int, eps: float, eps_placement: str = "inside"):
        super().__init__()
        self.eps, self.eps_inside = eps, eps_placement == "inside"
        self.weight = params.new_param((dim,), params.constant(1.0), no_weight_decay=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        ms = xf.pow(2).mean(-1, keepdim=True)
        y = xf * torch.rsqrt(ms + self.eps) if self.eps_inside else xf / (ms.sqrt() + self.eps)
        return y.to(x.dtype) * self.weight


def make_norm(cfg: HyenaGLTConfig) -> RMSNorm:
    return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_eps_placement)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# The function of each MLP activation that the config accepts (config.MLP_ACTIVATIONS, the one
# list of their names): torch.nn.functional's function of that name, or none for "identity".
ACTIVATIONS = {name: _identity if name == "identity" else getattr(F, name) for name in MLP_ACTIVATIONS}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)). gate/up are separate so each is plainly column-parallel."""

    def __init__(self, cfg: HyenaGLTConfig, out_std: float, spec: ModelSpec = LOCAL, activation: str | None = None):
        super().__init__()
        self.act = ACTIVATIONS[activation or cfg.mlp_activation]
        self.gate_proj = spec.column_linear(cfg.d_model, cfg.mlp_hidden, cfg.init_std)
        self.up_proj = spec.column_linear(cfg.d_model, cfg.mlp_hidden, cfg.init_std)
        self.down_proj = spec.row_linear(cfg.mlp_hidden, cfg.d_model, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + mixer(norm(x)) [x (1 + g * conservation)], then + mlp(norm(.)).

    The mixer is picked by the layer code (S, D, H: Hyena operator; *: attention); every
    linear layer, convolution and the attention kernel come from `spec`. Activations are
    (B, L, D), or (L, B, D) for a sequence-first spec; `conservation` has the same leading
    dims, `position_ids` are global positions (None: 0..L-1)."""

    def __init__(self, code: str, cfg: HyenaGLTConfig, layer_index: int, spec: ModelSpec = LOCAL):
        super().__init__()
        self.code = code
        self.mixer_norm = make_norm(cfg)
        self.mixer = make_mixer(code, cfg, spec)
        self.mlp_norm = make_norm(cfg)
        first = cfg.first_mlp_activation if layer_index == 0 else None  # Evo 2: GELU in layer 0 only
        self.mlp = GatedMLP(cfg, cfg.init_std / math.sqrt(2 * cfg.num_layers), spec, first)
        spec.mark_sequence_split(self.mixer_norm)
        spec.mark_sequence_split(self.mlp_norm)
        if cfg.conservation:
            # Starts at 0 so conservation scores change nothing until training finds them useful.
            self.conservation_gate = params.new_param((cfg.d_model,), params.constant(0.0), no_weight_decay=True)
            spec.mark_sequence_split(self.conservation_gate)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.mixer(self.mixer_norm(x), position_ids)
        if conservation is not None and hasattr(self, "conservation_gate"):
            y = y * (1 + self.conservation_gate * conservation[..., None].to(y.dtype))
        x = x + y
        return x + self.mlp(self.mlp_norm(x))

    def extend(self, x, position_ids, state: dict | None, conservation=None):
        """Inference: continue from the mixer's cache entry; returns (output, new entry)."""
        y, state = self.mixer.extend(self.mixer_norm(x), position_ids, state)
        if conservation is not None and hasattr(self, "conservation_gate"):
            y = y * (1 + self.conservation_gate * conservation[..., None].to(y.dtype))
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state
