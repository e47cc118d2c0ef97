"""Data parallelism for a whole-model module, with the ParallelModel step interface.

Models the pipeline chunks do not cover (the token-merging U-shape, whose patch boundaries
depend on the data) run as one module per rank: the single-device model, or its
tensor-parallel shard (merging.py), and each data-parallel rank takes its share of the
global batch. `forward_backward` follows the same contract as
build.ParallelModel.forward_backward: the loss denominator (total loss weight) is
all-reduced first, each rank back-propagates its local weighted sum divided by it, and
gradients are summed over data parallel, so the result equals one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hyena_glt.loss import default_loss_weights

from .grads import allreduce_coalesced
from .sharding import named_persistent_buffers
from .groups import RankContext


class ReplicatedModel(nn.Module):
    def __init__(self, model: nn.Module, ctx: RankContext, device: torch.device):
        super().__init__()
        self.model = model.to(device)
        self.ctx, self.device = ctx, device
        self.config = model.config
        self.chunks = nn.ModuleList()  # no pipeline chunks
        self.holds_loss = True

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.model.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        backbone = getattr(self.model, "model", None)
        if not hasattr(backbone, "activation_checkpointing"):
            raise ValueError(f"activation checkpointing: {type(self.model).__name__} does not support it")
        backbone.activation_checkpointing = enabled

    def named_persistent_buffers(self):
        return named_persistent_buffers(self.model)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {n: p.detach() for n, p in self.named_parameters()}

    def forward_backward(self, micro_batches: list[dict], *, forward_only: bool = False, reduce_dp_cp: bool = True,
                         grad_reduction: str = "sum", logits_out: list | None = None):
        group = self.ctx.dp_cp_group
        keys = ("input_ids", "labels", "loss_weights", "seq_type", "conservation")
        local = [{k: mb[k].to(self.device) for k in keys if mb.get(k) is not None} for mb in micro_batches]
        for mb in local:
            if "labels" in mb and "loss_weights" not in mb:
                mb["loss_weights"] = default_loss_weights(mb["labels"])
        weight_sum = sum((mb["loss_weights"].double().sum() for mb in local if "loss_weights" in mb),
                         torch.zeros((), dtype=torch.float64)).to(self.device)
        dist.all_reduce(weight_sum, group=group)
        scale = (group.size() if grad_reduction == "mean" else 1.0) / weight_sum.clamp_min(1e-8)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train(not forward_only)
        with torch.set_grad_enabled(not forward_only):
            for mb in local:
                out = self.model(**mb)
                # Report the language-model part (the U-shape adds patcher terms to loss_sum in training).
                lm = getattr(out, "lm_loss_sum", None)
                if out.loss_sum is not None:  # (None: a probe batch without targets)
                    loss_sum += (lm if lm is not None else out.loss_sum).detach().double()
                if logits_out is not None:
                    logits_out.append(self._full_logits(out.logits.detach()))
                if not forward_only and out.loss_sum is not None:
                    (out.loss_sum * scale.to(out.loss_sum.dtype)).backward()
        dist.all_reduce(loss_sum, group=group)
        if not forward_only and reduce_dp_cp and group.size() > 1:
            grads = []
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
            allreduce_coalesced(grads, group)
        self.model.train()
        return loss_sum, weight_sum

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L, V) from a tensor-parallel model's vocab shards (B, L, V/tp)."""
        if self.ctx.tp == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.ctx.tp)]
        dist.all_gather(parts, logits.contiguous(), group=self.ctx.tp_group)
        return torch.cat(parts, dim=-1)
