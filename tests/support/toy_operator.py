"""A layer kind from outside the package: `T`, a gated causal convolution, in this one file.

It proves that a new operator needs no edit of hyena_glt, megatron_adapters or launch
(tests/model/test_operator_registry.py): importing this module registers `T`, after which
`T` is a valid pattern character and the model, every parallel layout, `train --dry-run`,
`bench gpu`'s FLOPs and cached inference all know it, from the declaration below. A run in
other processes gets it by naming this module in HYENA_GLT_PLUGINS.

    u = gate_value_proj(x)             D -> 2D, rows laid out (channel, gate|value)
    g, v = split(u)
    y = out_proj(silu(g) * conv(v))    conv: depthwise causal, TAPS explicit taps per channel

The interleaved rows make a contiguous split of gate_value_proj (column parallel) hand each
tensor-parallel rank whole channels, with their taps (split on dim 0) and out_proj's input
columns (row parallel). The convolution goes through spec.short_conv, so under context
parallelism each zigzag chunk receives the TAPS-1 positions before it (a halo exchange), and
the inference state is v's last TAPS-1 values per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyena_glt import params
from hyena_glt.fftconv import fir_extend
from hyena_glt.kinds import (
    CACHE_RECURRENT,
    CP_HALO,
    CP_SEND_HALO,
    CPExchange,
    LayerKind,
    direct_conv_flops,
    register_kind,
)
from hyena_glt.spec import LOCAL, ModelSpec

CODE = "T"
TAPS = 5


class GatedConv(nn.Module):
    def __init__(self, cfg, out_std: float, spec: ModelSpec = LOCAL):
        super().__init__()
        self.spec = spec
        channels = spec.local(cfg.d_model, "d_model")
        self.gate_value_proj = spec.column_linear(cfg.d_model, 2 * cfg.d_model, cfg.init_std)
        self.taps = params.new_param((channels, TAPS), params.fan_in_uniform(TAPS), no_weight_decay=True)
        self.out_proj = spec.row_linear(cfg.d_model, cfg.d_model, out_std)

    @staticmethod
    def _split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C2, L = u.shape  # (B, 2C, L), rows (channel, gate|value)
        u = u.reshape(B, C2 // 2, 2, L)
        return u[:, :, 0], u[:, :, 1].contiguous()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        g, v = self._split(spec.to_channels(self.gate_value_proj(x)))
        return self.out_proj(spec.from_channels(F.silu(g) * spec.short_conv(v, self.taps)))

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        g, v = self._split(self.gate_value_proj(x).transpose(1, 2))
        y, history = fir_extend(v, self.taps, (state or {}).get("history"))
        return self.out_proj((F.silu(g) * y).transpose(1, 2)), {"history": history}


def flops(cfg, seq_len: int) -> dict[str, float]:
    D = cfg.d_model
    return {"matmul": 2.0 * (2 * D * D + D * D), "conv": direct_conv_flops(D, TAPS)}


def activations(cfg, seq_len: int, tp: int) -> float:
    return 5 * cfg.d_model / tp  # projection output (2), convolution output, silu(g), their product


KIND = register_kind(LayerKind(
    code=CODE, name="toy_gated_conv", description="gated causal convolution (test plug-in)",
    build=GatedConv, flops=flops, activations=activations,
    cache=CACHE_RECURRENT, cache_state=lambda cfg, length: {"history": (cfg.d_model, TAPS - 1)},
    tp_split={"gate_value_proj.weight": 0, "taps": 0, "out_proj.weight": 1},
    cp=CP_HALO, halo=lambda cfg: TAPS - 1, cp_sends=lambda cfg: (CPExchange(CP_SEND_HALO, cfg.d_model, taps=TAPS - 1),)))
