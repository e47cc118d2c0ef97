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
import torch.nn.functional as F
from torch import nn

from .. import params
from ..config import PATCHING, PATCHING_NONE, HyenaGLTConfig
from ..layers import Block, make_norm
from ..model import ByteBackbone, CausalLM, CausalLMOutput, LayerStack, Stage
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

    The patcher and the bridge see whole sequences; the blocks see what `spec` gives them
    (`to_blocks` / `from_blocks`: with context or sequence parallelism, this rank's share, in
    the blocks' layout; on one device the same tensor). The patch stream is padded with empty
    slots at its end up to what the blocks' share needs; the causal global model never lets
    them reach a real patch. A pipeline `stage` holds the byte encoder, patcher and merge if
    first, its global blocks (keyed by global index), and the unmerge, byte decoder and
    output if last; the pieces below (`encode`, `merge`, `run_global`, `decode`) are what a
    stage runs.
    """

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL, stage: Stage | None = None):
        super().__init__()
        if config.patching == PATCHING_NONE:
            *merging, last = (repr(m) for m in PATCHING if m != PATCHING_NONE)
            raise ValueError(f"patching: BLTModel needs patching {', '.join(merging)} or {last} "
                             f"(use HyenaGLTModel for {PATCHING_NONE!r})")
        stage = stage or Stage.whole(config.num_layers)
        self.config, self.spec, self.stage = config, spec, stage
        enc_cfg = sub_config(config, config.local_encoder_pattern)
        dec_cfg = sub_config(config, config.local_decoder_pattern)
        if stage.first or (stage.last and config.tie_embeddings):
            self.build_input_embeddings(config, spec, features=stage.first)
        if stage.first:
            self.encoder = nn.ModuleList(Block(c, enc_cfg, i, spec) for i, c in enumerate(enc_cfg.layers))
            self.patcher = make_patcher(config, spec)
        if stage.first or stage.last:
            self.positions = BLTPositionManager(config, pool=stage.first, unpool=stage.last)
        self.layers = LayerStack({i: Block(config.layers[i], config, i, spec) for i in stage.layers})  # global model
        if stage.last:
            self.global_norm = make_norm(config)
            spec.mark_sequence_split(self.global_norm)
            self.decoder = nn.ModuleList(Block(c, dec_cfg, i, spec) for i, c in enumerate(dec_cfg.layers))
            self.final_norm = make_norm(config)
            spec.mark_sequence_split(self.final_norm)

    # ---- the pieces a stage runs ----
    def byte_inputs(self, input_ids, conservation=None, position_ids=None):
        """(whole positions (B or 1, L), the blocks' positions, the blocks' conservation)."""
        spec = self.spec
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cons = None if conservation is None else spec.to_blocks(conservation[..., None])[..., 0]
        return position_ids, spec.split_context(position_ids), cons

    def encode(self, input_ids, seq_type=None, block_positions=None, block_conservation=None):
        """Embeddings and the local encoder's output, in the blocks' layout."""
        x = self.embed_tokens(self.spec.split_context(input_ids), seq_type)
        h = x
        for layer in self.encoder:
            h = self.run_block(layer, h, block_positions, block_conservation)
        return x, h

    def merge(self, input_ids, x, h, position_ids, labels=None, loss_weights=None):
        """Encoder output (blocks' layout) -> (patch slots in the blocks' layout, info,
        patcher output, the whole byte states)."""
        spec = self.spec
        h_whole = spec.from_blocks(h)
        x_whole = spec.from_blocks(x) if self.patcher.reads_states else None
        pout = self.patcher(input_ids, x_whole, h_whole, labels, loss_weights)
        slots = self.config.patch_slots(input_ids.shape[1])
        patches, info = self.positions.create_patch_representations(h_whole, pout.boundaries, slots, position_ids,
                                                                     pout.lag)
        pad = self.block_slots(slots) - slots
        return spec.to_blocks(F.pad(patches, (0, 0, 0, pad))), info, pout, h_whole

    def block_slots(self, slots: int) -> int:
        """Patch slots padded for the blocks: a multiple of the spec's sequence multiple, with
        context-parallel chunks that cover the short convolutions' halo."""
        m = self.spec.sequence_multiple
        need = self.spec.context_chunks * self.config.short_conv_halo() if self.spec.context_chunks > 1 else 0
        return -(-max(slots, need) // m) * m

    def global_positions(self, info: PatchInfo) -> torch.Tensor:
        """The blocks' share of the patch positions (RoPE over the patches' original start
        positions), padding slots continuing past the last byte."""
        pos = info.patch_positions
        pad = self.block_slots(info.num_slots) - info.num_slots
        extra = pos[:, -1:] + 1 + torch.arange(pad, device=pos.device)
        return self.spec.split_context(torch.cat([pos, extra], dim=1))

    def run_global(self, g, positions):
        for layer in self.layers:
            g = self.run_block(layer, g, positions)
        return g

    def decode(self, g, info, h_whole, gate, block_positions=None, block_conservation=None):
        """Global output (blocks' layout) -> byte hidden states after the final norm (blocks' layout)."""
        spec = self.spec
        g = spec.from_blocks(self.global_norm(g))[:, : info.num_slots]
        y, _ = self.positions.reconstruct_byte_representations(g, info, h_whole, gate)
        y = spec.to_blocks(y)
        for layer in self.decoder:
            y = self.run_block(layer, y, block_positions, block_conservation)
        return self.final_norm(y)

    # ---- the whole model ----
    def forward_with_info(
        self,
        input_ids: torch.Tensor,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PatchInfo, PatcherOutput]:
        positions, block_pos, block_cons = self.byte_inputs(input_ids, conservation, position_ids)
        x, h = self.encode(input_ids, seq_type, block_pos, block_cons)
        g, info, pout, h_whole = self.merge(input_ids, x, h, positions, labels, loss_weights)
        g = self.run_global(g, self.global_positions(info))
        return self.decode(g, info, h_whole, pout.gate, block_pos, block_cons), info, pout

    def forward(self, input_ids, seq_type=None, conservation=None, position_ids=None) -> torch.Tensor:
        return self.forward_with_info(input_ids, seq_type, conservation, position_ids)[0]

    @torch.no_grad()
    def calibrate_patcher(self, input_ids: torch.Tensor) -> float | None:
        """Entropy threshold / merger bias giving a boundary rate of 1 / patch_size on this batch."""
        if isinstance(self.patcher, EntropyPatcher):
            return self.patcher.calibrate(input_ids)
        if isinstance(self.patcher, AdaptiveTokenMerger):
            _, block_pos, _ = self.byte_inputs(input_ids)
            x, h = self.encode(input_ids, block_positions=block_pos)
            return self.patcher.calibrate(self.spec.from_blocks(x), self.spec.from_blocks(h))
        return None


class BLTForCausalLM(CausalLM):
    """Next-byte LM over the U-shape; same forward signature and output as HyenaGLTForCausalLM."""

    family = "token-merging"

    @staticmethod
    def accepts(config: HyenaGLTConfig) -> bool:
        return config.patching != PATCHING_NONE

    def __init__(self, config: HyenaGLTConfig, initialize: bool = True, spec: ModelSpec = LOCAL,
                 stage: Stage | None = None):
        super().__init__()
        self.check_config(config)
        self.config, self.spec = config, spec
        self.model = BLTModel(config, spec, stage)
        self.stage = self.model.stage
        if self.stage.last:
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
