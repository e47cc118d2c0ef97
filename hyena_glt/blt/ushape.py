"""The byte-level U-shaped causal LM (BLT-style token merging) built from the plain model's blocks.

    bytes -> embedding -> local encoder (cheap S/D blocks over bytes)
          -> patcher: boundaries (prefix-only)            [patchers.py]
          -> bytes pooled into P patch slots (+ positions) [position.py, bridge.py]
          -> global striped model over patches (config.pattern)
          -> patches back to bytes: byte i reads only patches complete before its own patch
          -> local decoder over bytes -> next-byte logits (tied to the embedding by default)

Causality: boundaries at byte i depend on bytes <= i; patch k is read only by bytes of
patches > k, all of whose bytes (and k's length) are known by then; every block is causal.
So the logits at byte i never depend on bytes > i. A lookahead patcher (entropy_mode
'optimal', boundary at p from bytes <= p + lag) is read `lag` bytes late: byte i treats the
patch holding byte i - lag as its own (`PatchInfo.read_ids`), so again only bytes <= i count.

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

import torch
from torch import nn

from .. import params
from ..config import HyenaGLTConfig
from ..layers import Block, make_norm
from ..model import ByteBackbone, CausalLM, CausalLMOutput
from ..spec import LOCAL, ModelSpec
from .patchers import AdaptiveTokenMerger, EntropyPatcher, PatcherOutput, make_patcher, sub_config
from .position import BLTPositionManager
from .segments import PatchInfo


@dataclass
class BLTCausalLMOutput(CausalLMOutput):
    lm_loss_sum: torch.Tensor | None = None
    aux_loss_sum: torch.Tensor | None = None
    patch_info: PatchInfo | None = None
    patcher: PatcherOutput | None = None


class BLTModel(ByteBackbone, nn.Module):
    """The U-shaped backbone: byte ids -> byte-level hidden states (B, L, D).

    Every residual block (local encoder, global model, local decoder, entropy model) is the
    plain model's `Block`, built with `spec`. With activation checkpointing the blocks are
    recomputed in backward; the patcher and bridge, which keep state, are not.
    """

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL):
        super().__init__()
        if config.patching == "none":
            raise ValueError("patching: BLTModel needs patching 'static', 'entropy', 'learned', 'dual' or 'optimal' "
                             "(use HyenaGLTModel for 'none')")
        if spec.seq_first:
            raise ValueError("the token-merging U-shape runs batch-first: build it with a spec whose seq_first is False")
        self.config, self.spec = config, spec
        enc_cfg = sub_config(config, config.local_encoder_pattern)
        dec_cfg = sub_config(config, config.local_decoder_pattern)
        self.build_input_embeddings(config, spec)
        self.encoder = nn.ModuleList(Block(c, enc_cfg, i, spec) for i, c in enumerate(enc_cfg.layers))
        self.patcher = make_patcher(config, spec)
        self.positions = BLTPositionManager(config)
        self.layers = nn.ModuleList(Block(c, config, i, spec) for i, c in enumerate(config.layers))  # global model
        self.global_norm = make_norm(config)
        self.decoder = nn.ModuleList(Block(c, dec_cfg, i, spec) for i, c in enumerate(dec_cfg.layers))
        self.final_norm = make_norm(config)

    def encode(self, input_ids, seq_type=None, conservation=None, position_ids=None):
        x = self.embed_tokens(input_ids, seq_type)
        h = x
        for layer in self.encoder:
            h = self.run_block(layer, h, position_ids, conservation)
        return x, h

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
        patches, info = self.positions.create_patch_representations(h, patcher_out.boundaries, slots, position_ids,
                                                                     patcher_out.lag)
        g = patches
        for layer in self.layers:
            g = self.run_block(layer, g, info.patch_positions)  # RoPE over the patches' original start positions
        g = self.global_norm(g)
        y, _ = self.positions.reconstruct_byte_representations(g, info, h, patcher_out.gate)
        for layer in self.decoder:
            y = self.run_block(layer, y, position_ids, conservation)
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


class BLTForCausalLM(CausalLM):
    """Next-byte LM over the U-shape; same forward signature and output as HyenaGLTForCausalLM."""

    family = "token-merging"

    @staticmethod
    def accepts(config: HyenaGLTConfig) -> bool:
        return config.patching != "none"

    def __init__(self, config: HyenaGLTConfig, initialize: bool = True, spec: ModelSpec = LOCAL):
        super().__init__()
        self.check_config(config)
        self.config, self.spec = config, spec
        self.model = BLTModel(config, spec)
        self.build_output(config, spec)
        if initialize:
            params.initialize(self, config.seed)

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
        logits = self.logits(hidden)
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
