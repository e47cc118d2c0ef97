"""Token merging (the U-shaped BLTForCausalLM) in every layout: its pipeline stages as
megatron's schedules drive them.

Inside a stage the model does the layout's work itself: its blocks see their CP / SP share,
its patcher and bridge see whole sequences, and the spec's `to_blocks` / `from_blocks` move
between the two, gradients included (hyena_glt/blt/ushape.py, spec.py). So patches that
cross a CP or SP border are pooled exactly as on one device.

Between pipeline stages, megatron's p2p sends one sequence-first tensor per micro-batch;
three things travel in it, stacked along the sequence:

    [ patch stream (this rank's share) ; byte states h (this rank's share) ; side rows ]

The last stage needs h and the patch boundaries to unmerge, every stage needs the
boundaries for the patches' positions, and the learned patcher's gate carries gradient
back to it. The side rows hold the (B, L) boundaries (0/1, exact in any dtype) and the gate,
packed d_model values to a row, whole on every rank (2L/d_model rows beside L/cp of h).

The patcher's loss terms (entropy-model CE when trained jointly, the learned patcher's
compression term) are computed on the first stage, on whole sequences, by every CP rank:
`AddLoss` starts their backward from the first stage's output, weighted by the step's loss
scale and spec.whole_loss_scale (1/cp: the CP sum of the gradients counts them once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyena_glt.blt.patchers import patcher_lag
from hyena_glt.blt.segments import patch_info
from hyena_glt.blt.ushape import BLTForCausalLM

from .groups import RankContext


class AddLoss(torch.autograd.Function):
    """Identity on `out` whose backward also starts the backward of `loss`, weighted by
    `scale`: a loss term computed on a stage whose output is not the loss (megatron-core's
    MoE auxiliary losses reach the router the same way)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.loss_dtype = loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad, scale.to(ctx.loss_dtype).reshape(()), None


class StageRows:
    """Row counts of the tensor one rank sends to the next stage, for sequences of L bytes."""

    def __init__(self, lm: BLTForCausalLM, ctx: RankContext, seq_len: int):
        cfg = lm.config
        self.share = ctx.cp * (ctx.tp if ctx.sp else 1)  # ranks one sequence is split over
        self.side_per_byte = 2 if cfg.patching == "learned" else 1  # boundary (+ gate)
        self.patches = lm.model.block_slots(cfg.patch_slots(seq_len)) // self.share
        self.bytes = seq_len // self.share
        self.side = -(-self.side_per_byte * seq_len // cfg.d_model)
        self.d_model = cfg.d_model

    @property
    def seq_length(self) -> int:
        """The `seq_length` megatron's schedules size their buffers from (they divide it by cp
        and, with SP, by tp)."""
        return (self.patches + self.bytes + self.side) * self.share

    def pack(self, g: torch.Tensor, h: torch.Tensor, boundaries: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        side = boundaries.to(g.dtype)[..., None]
        if self.side_per_byte == 2:
            side = torch.cat([side, gate.to(g.dtype)[..., None]], dim=-1)
        B = side.shape[0]
        flat = F.pad(side.reshape(B, -1), (0, self.side * self.d_model - side[0].numel()))
        return torch.cat([g, h, flat.view(B, self.side, self.d_model).transpose(0, 1)], dim=0)

    def unpack(self, t: torch.Tensor, seq_len: int):
        g, h, rows = t.split([self.patches, self.bytes, self.side], dim=0)
        B = t.shape[1]
        side = rows.transpose(0, 1).reshape(B, -1)[:, : self.side_per_byte * seq_len].view(B, seq_len, self.side_per_byte)
        return g, h, side[..., 0] > 0.5, side[..., 1] if self.side_per_byte == 2 else None


def run_stage(stage, batch: dict) -> torch.Tensor:
    """One pipeline stage of the U-shape on a micro-batch (see build.localize_batch for its
    keys): the tensor for the next stage, or the last stage's vocab-sharded logits (its final
    hidden states for a co-training task micro-batch)."""
    lm = stage.lm
    m, spec, cfg = lm.model, lm.spec, lm.config
    ids = batch["whole_input_ids"]
    L = ids.shape[1]
    positions, block_pos, block_cons = m.byte_inputs(ids, batch.get("whole_conservation"))
    rows = StageRows(lm, stage.ctx, L)
    aux, h_whole = None, None
    task = "task" in batch  # a co-training task micro-batch (task_heads.py): ends at the hidden states
    if stage.is_first:
        x, h = m.encode(ids, batch.get("seq_type"), block_pos, block_cons)
        g, info, pout, h_whole = m.merge(ids, x, h, positions, batch.get("whole_labels"), batch.get("whole_loss_weights"))
        gate = pout.gate
        # The patcher's loss terms belong to the LM objective (a task head reads the backbone only).
        if stage.training and pout.aux_loss_sum is not None and not task:
            aux = pout.aux_loss_sum
    else:
        g, h, boundaries, gate = rows.unpack(stage._input_tensor, L)
        info = patch_info(boundaries, cfg.patch_slots(L), positions, patcher_lag(cfg))
    g = m.run_global(g, m.global_positions(info))
    if stage.is_last:
        if h_whole is None:
            h_whole = spec.from_blocks(h)
        out = m.decode(g, info, h_whole, gate, block_pos, block_cons)
        if not task:
            out = lm.logits(out)
    else:
        out = rows.pack(g, h, info.boundaries, gate)
    if aux is not None and torch.is_grad_enabled():
        out = AddLoss.apply(out, aux, batch["loss_scale"] * spec.whole_loss_scale)
    return out
