"""Data parallelism for a whole-model module, with the ParallelModel step interface.

The fine-tuning models of hyena_glt.heads (a task head, or a multi-task model whose
micro-batches name their task: {"input_ids", "labels", "task"}) run as one module per rank,
and each data-parallel rank takes its share of the global batch. (Both language-model
families, and task heads co-trained with them, run as build.ParallelModel.)

`forward_backward` follows the same contract as build.ParallelModel.forward_backward: the
loss denominator (total loss weight) is all-reduced first, each rank back-propagates its
local weighted sum divided by it, and gradients are summed over data parallel, so the result
equals one process on the whole batch. The loss weight of a micro-batch is its
`loss_weights` (language models; default from the labels), or what the model's
`loss_weight_sum(micro_batch)` says (task heads: a function of the labels, the denominator
their HeadOutput.weight_sum reports). Parameters no rank's loss reached keep grad None
(grads.allreduce_reached_grads), so an optimizer step leaves them alone, as on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hyena_glt.loss import default_loss_weights

from .grads import allreduce_reached_grads
from .groups import RankContext
from .sharding import named_persistent_buffers

BATCH_KEYS = ("input_ids", "labels", "loss_weights", "seq_type", "conservation", "task")


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

    def _local(self, mb: dict) -> dict:
        """The micro-batch on this device, with its loss weights (language models)."""
        out = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mb.items()
               if k in BATCH_KEYS and v is not None}
        if not hasattr(self.model, "loss_weight_sum") and "labels" in out and "loss_weights" not in out:
            out["loss_weights"] = default_loss_weights(out["labels"])
        return out

    def _weight(self, mb: dict) -> torch.Tensor:
        own = getattr(self.model, "loss_weight_sum", None)
        if own is not None:
            return torch.as_tensor(own(mb), dtype=torch.float64)
        if "loss_weights" in mb:
            return mb["loss_weights"].double().sum()
        return torch.zeros((), dtype=torch.float64)

    def forward_backward(self, micro_batches: list[dict], *, forward_only: bool = False, reduce_dp_cp: bool = True,
                         grad_reduction: str = "sum", logits_out: list | None = None):
        group = self.ctx.dp_cp_group
        local = [self._local(mb) for mb in micro_batches]
        weight_sum = sum((self._weight(mb).to(self.device) for mb in local),
                         torch.zeros((), dtype=torch.float64, device=self.device))
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
        if not forward_only and reduce_dp_cp:
            allreduce_reached_grads([p for p in self.model.parameters() if p.requires_grad], group)
        self.model.train()
        return loss_sum, weight_sum

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L, V) from a tensor-parallel model's vocab shards (B, L, V/tp)."""
        if self.ctx.tp == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.ctx.tp)]
        dist.all_gather(parts, logits.contiguous(), group=self.ctx.tp_group)
        return torch.cat(parts, dim=-1)
