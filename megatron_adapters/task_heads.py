"""Task heads beside the language model: co-training (`tasks:` in `hyena-glt train`).

`TaskHeadsModel` wraps this rank's build.ParallelModel and adds one head per task on the
final hidden states. The heads are hyena_glt.heads' own modules (its TASK_KINDS registry),
named and initialised as in HyenaGLTMultiTask (`heads.<task>.<param>`, drawn from the
config seed and that name), so a checkpoint converts into a multi-task model directory.

Where they live: on the last pipeline stage, whole on every TP and CP rank (like the final
norm). A head reads the whole sequence: `spec.from_blocks` gathers this rank's share of the
final hidden states (the SP slice, then the CP zigzag chunks) with gradients, and such
whole-sequence work done by every CP rank enters the loss weighted `spec.whole_loss_scale`
(1/cp), so the DP x CP gradient sum counts it once (the token-merging U-shape's rule).

The objective of a step is L = L_lm + sum_k w_k L_k: the LM's token-weighted mean and each
task's mean over its labelled outputs in the global batch, times its weight. As for the LM,
each denominator is a function of the labels alone and is all-reduced over DP x CP before
the forward, so every layout computes the same objective and gradient.

A step's micro-batches: the LM's, and task micro-batches {"input_ids", "labels", "task"} of
the same (B, L). The task micro-batches run through megatron's schedule first (without
gradient reductions), then the LM's; the LM step's reductions (SP and tied-embedding sums,
DP x CP sum or ZeRO's) are linear, so they cover the gradients of both. The heads' own
DP x CP sum is done here (ZeRO reduces them itself: they are among this module's parameters).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from hyena_glt import params
from hyena_glt.config import PATCHING_NONE
from hyena_glt.heads import TaskSpec, make_head, task_kind
from hyena_glt.tokenizer import PAD_ID

from .build import ParallelModel, localize_batch
from .grads import allreduce_reached_grads
from .parallel_config import check_layout
from .pipeline import check_num_microbatches, run_schedule

HEADS = "heads"  # the heads' parameter-name prefix, as in hyena_glt.heads.HyenaGLTMultiTask


def is_head_parameter(name: str) -> bool:
    return name.startswith(HEADS + ".")


class TaskHeadsModel(nn.Module):
    """A ParallelModel with task heads; the same step interface (`forward_backward`)."""

    def __init__(self, lm: ParallelModel, tasks: dict[str, TaskSpec]):
        super().__init__()
        if not tasks:
            raise ValueError("tasks: need at least one task")
        self.lm, self.tasks = lm, dict(tasks)
        cfg = lm.config
        # No dropout: every rank of a layout, and every layout, must compute the same heads.
        heads = {n: make_head(t.kind, cfg.d_model, t.num_labels, cfg.init_std, 0.0) for n, t in self.tasks.items()}
        self.heads = nn.ModuleDict(heads if lm.holds_loss else {})
        self.heads.to(dtype=lm.dtype)
        params.initialize(self.heads, cfg.seed, prefix=HEADS + ".")
        self.heads.to(device=lm.device)
        # Full shapes now: ZeRO-3 partitions the parameters once the optimizer is built.
        self._head_shapes = {n: tuple(p.shape) for n, p in self.heads.named_parameters()}
        self.last_losses: dict[str, float] = {}  # the latest training step's mean losses: "lm" and each task

    # ---- what the trainer, the optimizers and checkpoints use of a ParallelModel
    config = property(lambda self: self.lm.config)
    ctx = property(lambda self: self.lm.ctx)
    device = property(lambda self: self.lm.device)
    dtype = property(lambda self: self.lm.dtype)
    layout = property(lambda self: self.lm.layout)
    holds_loss = property(lambda self: self.lm.holds_loss)
    chunks = property(lambda self: self.lm.chunks)

    def chunk_list(self):
        return self.lm.chunk_list()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.lm.set_activation_checkpointing(enabled)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self.lm.named_parameters(prefix, recurse, remove_duplicate)
        yield from self.heads.named_parameters(prefix=f"{prefix}.{HEADS}" if prefix else HEADS, recurse=recurse,
                                               remove_duplicate=remove_duplicate)

    def named_persistent_buffers(self):
        return self.lm.named_persistent_buffers()  # the heads have none

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {n: p.detach() for n, p in self.named_parameters()}

    def initial_head_state(self) -> dict[str, torch.Tensor]:
        """This rank's heads at their initial values (a warm start from a directory without them)."""
        seed = self.config.seed
        return {f"{HEADS}.{n}": params.full_init(p, f"{HEADS}.{n}", seed, self._head_shapes[n]).to(p.dtype)
                for n, p in self.heads.named_parameters()}

    # ---- the step
    def forward_backward(self, micro_batches: list[dict], *, forward_only: bool = False, reduce_dp_cp: bool = True,
                         grad_reduction: str = "sum", logits_out: list | None = None):
        """ParallelModel.forward_backward's contract. Without task micro-batches: the LM's
        (loss_sum, weight_sum). With them: (L, 1), L the step's objective (module docstring),
        and `last_losses` holds its parts."""
        tasks = [mb for mb in micro_batches if "task" in mb]
        lm = [mb for mb in micro_batches if "task" not in mb]
        if not tasks:
            return self.lm.forward_backward(lm, forward_only=forward_only, reduce_dp_cp=reduce_dp_cp,
                                            grad_reduction=grad_reduction, logits_out=logits_out)
        if not lm:
            raise ValueError("a co-training step needs language-model micro-batches beside the task ones")
        task_sums, task_counts = self.run_tasks(tasks, forward_only=forward_only, grad_reduction=grad_reduction)
        lm_sum, lm_weight = self.lm.forward_backward(lm, forward_only=forward_only, reduce_dp_cp=reduce_dp_cp,
                                                     grad_reduction=grad_reduction, logits_out=logits_out)
        if not forward_only and reduce_dp_cp and len(self.heads):
            allreduce_reached_grads(list(self.heads.parameters()), self.ctx.dp_cp_group)
        losses = {"lm": lm_sum.double() / lm_weight.double().clamp_min(1e-8)}
        losses.update({n: task_sums[i] / task_counts[i].clamp_min(1.0) for i, n in enumerate(self.tasks)})
        objective = losses["lm"] + sum(self.tasks[n].weight * losses[n] for n in self.tasks)
        self.last_losses = {k: v.item() for k, v in losses.items()}
        return objective, torch.ones_like(objective)

    def run_tasks(self, micro_batches: list[dict], *, forward_only: bool = False, grad_reduction: str = "sum",
                  logits_out: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (and backward, without gradient reductions) of task micro-batches through
        the pipeline. Returns per task, in `self.tasks` order, the global (loss_sum, count),
        the same on every rank. logits_out: if a list, each micro-batch's head output is
        appended, in order, on one rank per pipeline (last stage, TP and CP rank 0)."""
        ctx, pcfg, device = self.ctx, self.ctx.pcfg, self.device
        check_num_microbatches(len(micro_batches), pcfg.pp, pcfg.vpp)
        B, L = micro_batches[0]["input_ids"].shape
        if any(tuple(mb["input_ids"].shape) != (B, L) for mb in micro_batches):
            raise ValueError("all task micro-batches must have the same (batch, length) shape")
        check_layout(pcfg, self.config, seq_length=L)
        spec = self.chunk_list()[-1].model.spec
        names = list(self.tasks)
        counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        local = []
        for i, mb in enumerate(micro_batches):
            name = mb["task"]
            if name not in self.tasks:
                raise ValueError(f"task micro-batch names task {name!r}; the model has {names}")
            lb = localize_batch({"input_ids": mb["input_ids"]}, ctx, device, self.config.patching != PATCHING_NONE)
            lb.update(task=name, index=i, mask=(mb["input_ids"] != PAD_ID).to(device), labels=mb["labels"].to(device))
            count = float(task_kind(self.tasks[name].kind).weight(mb["labels"]))
            counts[names.index(name)] += count * spec.whole_loss_scale  # whole-sequence work on every CP rank
            local.append(lb)
        dist.all_reduce(counts, group=ctx.dp_cp_group)
        coef = torch.tensor([self.tasks[n].weight for n in names], dtype=torch.float64, device=device)
        coef = coef * (ctx.dp_cp_group.size() if grad_reduction == "mean" else 1.0) / counts.clamp_min(1.0)

        def loss_func(lb: dict, hidden: torch.Tensor):
            whole = spec.from_blocks(hidden)  # (B, L, D): the whole sequences, on every TP and CP rank
            head = self.heads[lb["task"]]
            logits = head(whole, lb["mask"])
            k = names.index(lb["task"])
            loss_sum = task_kind(self.tasks[lb["task"]].kind).loss(logits, lb["labels"]) * spec.whole_loss_scale
            info = {"task": k, "index": lb["index"], "loss_sum": loss_sum.detach()}
            if logits_out is not None:
                info["logits"] = logits.detach()
            n = (lb["labels"] != -100).sum().to(torch.int)  # megatron's schedules only add these up
            return loss_sum * coef[k].to(loss_sum.dtype), n, info

        def forward_step(data_iterator, chunk):
            lb = next(data_iterator)
            return chunk(lb), partial(loss_func, lb)

        store = run_schedule(self.chunk_list(), local, forward_step, seq_length=L, micro_batch_size=B,
                             forward_only=forward_only)
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        for info in store:
            sums[info["task"]] += info["loss_sum"].double()
        if pcfg.pp > 1:  # only the last stage has them
            dist.all_reduce(sums, group=ctx.pp_group)
        dist.all_reduce(sums, group=ctx.dp_cp_group)
        if logits_out is not None and store and ctx.coords.tp == 0 and ctx.coords.cp == 0:
            logits_out.extend(info["logits"] for info in sorted(store, key=lambda info: info["index"]))
        return sums, counts
