"""The parallel counterparts of hyena_glt's modules, and the model chunk a pipeline stage runs.

Each module computes exactly what its single-device twin computes, on this rank's share:
channels / heads / vocab rows split over TP, sequence split over CP (zigzag) and, between
blocks, over TP too when sequence parallel is on. Activations are sequence-first
(s, B, D), megatron-core's convention, so its linears, SP mappings and pipeline p2p apply
unchanged. Submodule names match the single-device model, and layers are keyed by their
global index, so `named_parameters()` yields canonical names on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.enums import ModelType
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyena_glt.config import HyenaGLTConfig
from hyena_glt.fftconv import causal_conv_direct
from hyena_glt.filters import ShortConv
from hyena_glt.genomic import MotifBranch, SeqTypeEmbedding
from hyena_glt.layers import ACTIVATIONS, RMSNorm
from hyena_glt.operators import rope, split_interleaved

from . import context_parallel as cpar
from . import sequence_parallel as spar
from .groups import RankContext
from .tensor_parallel import ColumnLinear, OutputLayer, RowLinear, sharded_filter, vocab_embedding


class ParallelHyenaOperator(nn.Module):
    def __init__(self, code: str, cfg: HyenaGLTConfig, ctx: RankContext, mcfg: ModelParallelConfig):
        super().__init__()
        tp = ctx.tp
        self.code = code
        self.groups = cfg.num_filter_groups // tp  # split_interleaved works on the local groups
        self.in_proj = ColumnLinear(cfg.d_model, 3 * cfg.d_model, mcfg)
        self.featurizer = ShortConv(3 * cfg.d_model // tp, cfg.featurizer_len)
        self.filter = sharded_filter(code, cfg, tp, ctx.coords.tp)
        self.out_proj = RowLinear(cfg.d_model, cfg.d_model, mcfg)
        self.cp_group = ctx.cp_group if ctx.cp > 1 else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        u = self.in_proj(x).permute(1, 2, 0)  # (B, 3D/tp, s_cp): full CP-local sequence
        if self.cp_group is None:
            u = self.featurizer(u)
        else:
            u = cpar.short_conv(u, self.featurizer.weight, self.cp_group, direct=True)
        x1, x2, v = split_interleaved(u, self.groups)
        z = x2 * v
        if self.cp_group is None:
            z = self.filter(z)
        elif self.code == "S":
            z = cpar.short_conv(z, self.filter.filter(), self.cp_group, skip=self.filter.skip)
        else:
            z = cpar.long_conv(z, self.filter, self.cp_group)
        return self.out_proj((x1 * z).permute(2, 0, 1))


class ParallelAttention(nn.Module):
    code = "*"

    def __init__(self, cfg: HyenaGLTConfig, ctx: RankContext, mcfg: ModelParallelConfig):
        super().__init__()
        self.heads, self.head_dim, self.rope_base = cfg.num_heads // ctx.tp, cfg.head_dim, cfg.rope_base
        self.qkv_proj = ColumnLinear(cfg.d_model, 3 * cfg.d_model, mcfg)
        self.out_proj = RowLinear(cfg.d_model, cfg.d_model, mcfg)
        self.cp_group = ctx.cp_group if ctx.cp > 1 else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (s, B, 3D/tp), rows (head, q|k|v, head_dim)
        s, B, _ = qkv.shape
        qkv = qkv.view(s, B, self.heads, 3, self.head_dim).permute(3, 1, 2, 0, 4)  # 3, B, h, s, hd
        pos = positions if positions.dim() == 2 else positions[None]  # (B, s): per-sample (patch) positions
        q, k, v = rope(qkv[0], pos, self.rope_base), rope(qkv[1], pos, self.rope_base), qkv[2]
        if self.cp_group is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Every query needs every earlier key: gather K, V (already rotated at their own global
            # positions) from all CP ranks and mask by global position, not by local index.
            kv = cpar.gather_kv(torch.stack([k, v]).permute(3, 0, 1, 2, 4).contiguous(), self.cp_group)
            k, v = kv.permute(1, 2, 3, 0, 4)  # (B, h, L, hd) each, CP-rank order
            key_pos = cpar.zigzag_order(kv.shape[0], self.cp_group.size(), device=positions.device)
            mask = key_pos[None, :] <= positions[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.permute(2, 0, 1, 3).reshape(s, B, self.heads * self.head_dim))


class ParallelGatedMLP(nn.Module):
    def __init__(self, cfg: HyenaGLTConfig, mcfg: ModelParallelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.mlp_activation]
        self.gate_proj = ColumnLinear(cfg.d_model, cfg.mlp_hidden, mcfg)
        self.up_proj = ColumnLinear(cfg.d_model, cfg.mlp_hidden, mcfg)
        self.down_proj = RowLinear(cfg.mlp_hidden, cfg.d_model, mcfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ParallelBlock(nn.Module):
    def __init__(self, code: str, cfg: HyenaGLTConfig, ctx: RankContext, mcfg: ModelParallelConfig):
        super().__init__()
        self.code = code
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = ParallelAttention(cfg, ctx, mcfg) if code == "*" else ParallelHyenaOperator(code, cfg, ctx, mcfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = ParallelGatedMLP(cfg, mcfg)
        if cfg.conservation:
            self.conservation_gate = nn.Parameter(torch.empty(cfg.d_model))
        if ctx.sp:
            for m in (self.mixer_norm, self.mlp_norm):
                spar.mark_sequence_parallel(m)
            if cfg.conservation:
                self.conservation_gate.sequence_parallel = True

    def forward(self, x: torch.Tensor, positions: torch.Tensor, conservation: torch.Tensor | None) -> torch.Tensor:
        y = self.mixer(self.mixer_norm(x), positions)
        if conservation is not None and hasattr(self, "conservation_gate"):
            y = y * (1 + self.conservation_gate * conservation[..., None].to(y.dtype))
        x = x + y
        return x + self.mlp(self.mlp_norm(x))


class HyenaGLTChunk(nn.Module):
    """The layers of one (virtual) pipeline stage on this rank, plus the embedding if it is the
    first stage and the final norm / output layer if it is the last.

    Forward takes the rank-local micro-batch (see build.localize_batch); it returns the hidden
    states (s, B, D) for the next stage, or vocab-sharded logits (s_cp, B, V/tp) on the last.
    `config` is the megatron config (TransformerConfig; the schedules read it from there); the model's
    own config is `hyena_config`.
    """

    model_type = ModelType.encoder_or_decoder

    def __init__(
        self,
        cfg: HyenaGLTConfig,
        ctx: RankContext,
        mcfg: ModelParallelConfig,
        stage: int,
        layer_ids: list[int],
        vp_stage: int | None = None,
    ):
        super().__init__()
        self.config = mcfg
        self.hyena_config = cfg
        self.stage, self.layer_ids = stage, list(layer_ids)
        if vp_stage is not None:
            self.vp_stage = vp_stage
        self.is_first = stage == 0
        self.is_last = stage == ctx.pcfg.num_stages - 1
        self.sp, self.tp, self.tp_rank = ctx.sp, ctx.tp, ctx.coords.tp
        self.cp_group = ctx.cp_group if ctx.cp > 1 else None
        self.tied = cfg.tie_embeddings

        self.model = nn.Module()
        if self.is_first or (self.is_last and self.tied):
            self.model.embed = vocab_embedding(cfg, mcfg)
            if self.tied:
                self.model.embed.weight.shared_embedding = True  # grads summed with the other copy
                if not self.is_first:
                    # megatron's grad-norm utilities skip `shared` params: count the copy once
                    self.model.embed.weight.shared = True
        if self.is_first:
            if cfg.seq_type_embedding:
                self.model.seq_type_embed = SeqTypeEmbedding(cfg.d_model, cfg.init_std)
            if cfg.motif_branch:
                self.model.motif = MotifBranch(cfg.d_model, cfg.motif_kernel_sizes, cfg.init_std)
        self.model.layers = nn.ModuleDict({str(i): ParallelBlock(cfg.layers[i], cfg, ctx, mcfg) for i in layer_ids})
        if self.is_last:
            self.model.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            if ctx.sp:
                spar.mark_sequence_parallel(self.model.final_norm)
            if self.tied:
                self.output_layer = OutputLayer(cfg.d_model, cfg.vocab_size, mcfg, tied=True)
            else:
                self.lm_head = OutputLayer(cfg.d_model, cfg.vocab_size, mcfg, tied=False)
        self._input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's schedules with the activation received from the previous stage."""
        self._input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def _motif(self, x: torch.Tensor) -> torch.Tensor:
        motif = self.model.motif
        xt = x.permute(1, 2, 0)  # (B, D, s_cp)
        feats = []
        for h in motif.filters:
            if self.cp_group is None:
                y = causal_conv_direct(xt, h)
            else:
                y = cpar.short_conv(xt, h, self.cp_group, direct=True)
            feats.append(F.silu(y))
        return motif.proj(torch.cat(feats, dim=1).permute(2, 0, 1))

    def embed(self, batch: dict) -> torch.Tensor:
        x = self.model.embed(batch["input_ids"].t())  # (s_cp, B, D), replicated over TP
        if batch.get("seq_type") is not None and hasattr(self.model, "seq_type_embed"):
            x = x + self.model.seq_type_embed.weight[batch["seq_type"]][None]
        if hasattr(self.model, "motif"):
            x = x + self._motif(x)
        return spar.enter(x, self.sp)

    # Set by the trainer (train.activation_checkpointing): keep only each block's input and
    # recompute the block in backward. Every rank recomputes the same blocks, so collectives
    # inside them (TP, CP all-to-all and halos) stay matched.
    activation_checkpointing = False

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch) if self.is_first else self._input_tensor
        for layer in self.model.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, batch["positions"], batch.get("conservation"), use_reentrant=False)
            else:
                x = layer(x, batch["positions"], batch.get("conservation"))
        if not self.is_last:
            return x
        h = self.model.final_norm(x)
        if self.tied:
            return self.output_layer(h, weight=self.model.embed.weight)
        return self.lm_head(h)
