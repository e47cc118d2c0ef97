"""Pure data parallelism for any single-device model, with the ParallelModel step interface.

Models the model-parallel layers do not cover (the token-merging U-shape, whose patch
boundaries depend on the data) run replicated: every data-parallel rank holds the whole
model and its share of the global batch. `forward_backward` follows the same contract as
build.ParallelModel.forward_backward: the loss denominator (total loss weight) is
all-reduced first, each rank back-propagates its local weighted sum divided by it, and
gradients are summed over data parallel, so the result equals one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .grads import _allreduce_coalesced
from .groups import RankContext


class ReplicatedModel(nn.Module):
    def __init__(self, model: nn.Module, ctx: RankContext, device: torch.device):
        super().__init__()
        self.model = model.to(device)
        self.ctx, self.device = ctx, device
        self.config = model.config
        self.chunks = nn.ModuleList()  # no megatron chunks: nothing for activation checkpointing to set

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.model.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {n: p.detach() for n, p in self.named_parameters()}

    def forward_backward(self, micro_batches: list[dict], *, forward_only: bool = False, reduce_dp_cp: bool = True,
                         grad_reduction: str = "sum", logits_out: list | None = None):
        group = self.ctx.dp_cp_group
        keys = ("input_ids", "labels", "loss_weights", "seq_type", "conservation")
        local = [{k: mb[k].to(self.device) for k in keys if mb.get(k) is not None} for mb in micro_batches]
        weight_sum = sum(mb["loss_weights"].double().sum() for mb in local).to(self.device)
        dist.all_reduce(weight_sum, group=group)
        scale = (group.size() if grad_reduction == "mean" else 1.0) / weight_sum.clamp_min(1e-8)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train(not forward_only)
        with torch.set_grad_enabled(not forward_only):
            for mb in local:
                out = self.model(**mb)
                # Report the language-model part (the U-shape adds patcher terms to loss_sum in training).
                lm = getattr(out, "lm_loss_sum", None)
                loss_sum += (lm if lm is not None else out.loss_sum).detach().double()
                if logits_out is not None:
                    logits_out.append(out.logits.detach())
                if not forward_only:
                    (out.loss_sum * scale.to(out.loss_sum.dtype)).backward()
        dist.all_reduce(loss_sum, group=group)
        if not forward_only and reduce_dp_cp and group.size() > 1:
            grads = []
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
            _allreduce_coalesced(grads, group)
        self.model.train()
        return loss_sum, weight_sum
