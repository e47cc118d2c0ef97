"""The byte-level U-shaped causal LM (BLT-style token merging) built from the plain model's blocks.

    bytes -> embedding -> local encoder (cheap S/D blocks over bytes)
          -> patcher: boundaries (prefix-only)            [patchers.py]
          -> bytes pooled into P patch slots (+ positions) [position.py, bridge.py]
          -> global striped model over patches (config.pattern)
          -> patches back to bytes: byte i reads only patches complete before its own patch
          -> local decoder over bytes -> next-byte logits (tied to the embedding by default)

Causality: boundaries at byte i depend on bytes <= i; patch k is read only by bytes of
patches > k, all of whose bytes (and k's length) are known by then; every block is causal.
So the logits at byte i never depend on bytes > i.

Static shapes: P = config.patch_slots(L) slots per sequence, padded and masked (padding
slots come after every real patch, so the causal global model never lets them reach a real
patch). The output is the same `CausalLMOutput` as `HyenaGLTForCausalLM` (loss_sum /
weight_sum), so a trainer drives both the same way. In training mode `loss_sum` also holds
the patcher's auxiliary terms (entropy-model CE when trained jointly, the learned patcher's
compression term), token-weighted so they add up across ranks and micro-batches;
`lm_loss_sum` is always the LM part alone and is what `loss_sum` is in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import params
from ..config import HyenaGLTConfig
from ..layers import Block, RMSNorm
from ..loss import weighted_cross_entropy
from ..model import ByteInputEmbedding, CausalLMOutput, HyenaGLTForCausalLM
from .patchers import AdaptiveTokenMerger, BlockFactory, EntropyPatcher, PatcherOutput, make_patcher, sub_config
from .position import BLTPositionManager
from .segments import PatchInfo


@dataclass
class BLTCausalLMOutput(CausalLMOutput):
    lm_loss_sum: torch.Tensor | None = None
    aux_loss_sum: torch.Tensor | None = None
    patch_info: PatchInfo | None = None
    patcher: PatcherOutput | None = None


class BLTModel(ByteInputEmbedding, nn.Module):
    """The U-shaped backbone: byte ids -> byte-level hidden states (B, L, D).

    `block` builds every residual block (local encoder, global model, local decoder, entropy
    model); the default is the single-device Block.
    """

    def __init__(self, config: HyenaGLTConfig, block: BlockFactory = Block):
        super().__init__()
        if config.patching == "none":
            raise ValueError("patching: BLTModel needs patching 'static', 'entropy' or 'learned' (use HyenaGLTModel for 'none')")
        self.config = config
        enc_cfg = sub_config(config, config.local_encoder_pattern)
        dec_cfg = sub_config(config, config.local_decoder_pattern)
        self.build_input_embeddings(config)
        self.encoder = nn.ModuleList(block(c, enc_cfg, i) for i, c in enumerate(enc_cfg.layers))
        self.patcher = make_patcher(config, block)
        self.positions = BLTPositionManager(config)
        self.layers = nn.ModuleList(block(c, config, i) for i, c in enumerate(config.layers))  # global model
        self.global_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder = nn.ModuleList(block(c, dec_cfg, i) for i, c in enumerate(dec_cfg.layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)


    def encode(self, input_ids, seq_type=None, conservation=None, position_ids=None):
        x = self.embed_tokens(input_ids, seq_type)
        h = x
        for layer in self.encoder:
            h = self._run(layer, h, position_ids, conservation)
        return x, h

    # Set by a trainer (train.activation_checkpointing): keep each block's input only and
    # recompute the block in backward. Blocks are pure functions of their inputs, so the
    # recomputation is exact (the patcher and bridge, which keep state, are not recomputed).
    activation_checkpointing = False

    def _run(self, layer, x, positions, conservation=None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, x, positions, conservation, use_reentrant=False)
        return layer(x, positions, conservation)

    def forward_with_info(
        self,
        input_ids: torch.Tensor,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PatchInfo, PatcherOutput]:
        x, h = self.encode(input_ids, seq_type, conservation, position_ids)
        patcher_out = self.patcher(input_ids, x, h, labels, loss_weights)
        slots = self.config.patch_slots(input_ids.shape[1])
        patches, info = self.positions.create_patch_representations(h, patcher_out.boundaries, slots, position_ids)
        g = patches
        for layer in self.layers:
            g = self._run(layer, g, info.patch_positions)  # RoPE over the patches' original start positions
        g = self.global_norm(g)
        y, _ = self.positions.reconstruct_byte_representations(g, info, h, patcher_out.gate)
        for layer in self.decoder:
            y = self._run(layer, y, position_ids, conservation)
        return self.final_norm(y), info, patcher_out

    def forward(self, input_ids, seq_type=None, conservation=None, position_ids=None) -> torch.Tensor:
        return self.forward_with_info(input_ids, seq_type, conservation, position_ids)[0]

    @torch.no_grad()
    def calibrate_patcher(self, input_ids: torch.Tensor) -> float | None:
        """Entropy threshold / merger bias giving a boundary rate of 1 / patch_size on this batch."""
        if isinstance(self.patcher, EntropyPatcher):
            return self.patcher.calibrate(input_ids)
        if isinstance(self.patcher, AdaptiveTokenMerger):
            x, h = self.encode(input_ids)
            return self.patcher.calibrate(x, h)
        return None


class BLTForCausalLM(nn.Module):
    """Next-byte LM over the U-shape; same forward signature and output as HyenaGLTForCausalLM."""

    def __init__(self, config: HyenaGLTConfig, initialize: bool = True, block: BlockFactory = Block):
        super().__init__()
        self.config = config
        self.model = BLTModel(config, block)
        if not config.tie_embeddings:
            self.lm_head = params.linear(config.d_model, config.vocab_size, config.init_std)
        if initialize:
            params.initialize(self, config.seed)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    # The two steps a tensor-parallel subclass replaces (vocab-sharded logits and their loss).
    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)

    def lm_loss(self, logits, labels, loss_weights) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_cross_entropy(logits, labels, loss_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BLTCausalLMOutput:
        hidden, info, pout = self.model.forward_with_info(
            input_ids, seq_type, conservation, position_ids, labels, loss_weights
        )
        logits = self.output_logits(hidden)
        out = BLTCausalLMOutput(logits=logits, hidden_states=hidden, patch_info=info, patcher=pout,
                                aux_loss_sum=pout.aux_loss_sum)
        if labels is not None:
            lm_sum, weight = self.lm_loss(logits, labels, loss_weights)
            out.lm_loss_sum, out.weight_sum = lm_sum, weight
            out.loss_sum = lm_sum + pout.aux_loss_sum.to(lm_sum.dtype) if self.training and pout.aux_loss_sum is not None else lm_sum
            out.loss = out.loss_sum / weight.clamp_min(1e-8)
        return out

    def calibrate_patcher(self, input_ids: torch.Tensor) -> float | None:
        return self.model.calibrate_patcher(input_ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Same checkpoint format (config.json + model.safetensors) and sampling loop as the plain model.
    save_pretrained = HyenaGLTForCausalLM.save_pretrained
    generate = HyenaGLTForCausalLM.generate

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: HyenaGLTConfig | None = None, map_location="cpu") -> "BLTForCausalLM":
        return HyenaGLTForCausalLM.from_pretrained.__func__(cls, directory, config, map_location)

