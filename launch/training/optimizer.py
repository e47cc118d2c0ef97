"""The optimizer of both trainers: AdamW with the no-weight-decay groups the model flags, warmup +
cosine LR, and the optimizer side of a training step, plain or through DeepSpeed ZeRO.

Both variants take the model's gradients as `forward_backward` leaves them (a
build.ParallelModel (either model family), or a replicated.ReplicatedModel: the fine-tuning
head models) and expose the same small surface to the trainers: `step(micro_batches)`,
`set_lr`, and full (unpartitioned over data parallel) optimizer states per parameter for
checkpoints, so a checkpoint does not depend on the data-parallel size or the ZeRO stage.

* `PlainOptimizer` (zero.stage 0; fine-tuning): gradients are summed over DP x CP by
  forward_backward; the global gradient norm is computed here (each parameter counted once
  across TP and pipeline stages) and clipped; torch AdamW (`build_adamw`) steps.
* `ZeroOptimizer` (stages 1-3): DeepSpeed owns the DP x CP reduction. Our backward (which
  the megatron-core pipeline schedules run with plain autograd) happens inside
  `engine.coalesce_grad_reduction()`, so ZeRO's per-parameter hooks stay quiet and one
  reduction pass runs at the end; DeepSpeed averages over its data-parallel group (DP x CP
  here), so forward_backward scales the loss by that group's size (`grad_reduction="mean"`).
  Every DeepSpeed internal it needs is behind megatron_adapters/deepspeed_zero.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megatron_adapters import deepspeed_zero as zero
from megatron_adapters.sharding import tp_split_dim


@dataclass(frozen=True)
class AdamWSettings:
    """What PlainOptimizer reads (pretraining passes its `train` config section,
    which has the same fields)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Filters, conv taps, norms, biases and skips are tagged `no_weight_decay` by the model."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "no_weight_decay", False) or p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=1e-8)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """LR for 1-based `step`: linear warmup to base_lr, then cosine down to base_lr * min_ratio."""
    if warmup and step <= warmup:
        return base_lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


ADAM_STATES = zero.ADAM_STATES


def _counted_once(name: str, p: torch.nn.Parameter) -> bool:
    """Whether this rank's copy of `name` enters the global grad norm: TP-sharded slices
    always; TP-replicated tensors on TP rank 0 only; the tied output-weight copy on the last
    pipeline stage never (the first stage holds the embedding)."""
    if getattr(p, "shared_embedding", False) and ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_first_stage(ignore_virtual=True):
            return False
    return tp_split_dim(name) is not None or ps.get_tensor_model_parallel_rank() == 0


def global_grad_norm(pm: nn.Module) -> torch.Tensor:
    sq = torch.zeros((), dtype=torch.float64, device=pm.device)
    for name, p in pm.named_parameters():
        if p.grad is not None and _counted_once(name, p):
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


class PlainOptimizer:
    """`train_cfg`: lr, weight_decay, betas, grad_clip (the train config section, or an
    AdamWSettings)."""

    zero_stage = 0

    def __init__(self, pm: nn.Module, train_cfg):
        self.pm, self.cfg = pm, train_cfg
        self.optimizer = build_adamw(pm, train_cfg.lr, train_cfg.weight_decay, train_cfg.betas)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, micro_batches: list[dict], autocast) -> tuple[float, float, float, bool]:
        """forward+backward+clip+step. Returns (loss_sum, weight_sum, grad_norm, stepped).
        Parameters the step's loss did not reach keep grad None, and AdamW leaves them alone."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss_sum, weight_sum = self.pm.forward_backward(micro_batches)
        norm = global_grad_norm(self.pm).item()
        finite = math.isfinite(loss_sum.item()) and math.isfinite(norm)
        if finite:
            if self.cfg.grad_clip and norm > self.cfg.grad_clip:
                scale = self.cfg.grad_clip / (norm + 1e-6)
                for p in self.pm.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item(), weight_sum.item(), norm, finite

    # ---- checkpoint surface: full-over-DP tensors by canonical name ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.pm.named_parameters():
            st = self.optimizer.state.get(p, {})
            for key in ADAM_STATES:
                if key in st:
                    out[f"{key}/{name}"] = st[key].detach().cpu()
        return out

    def adam_steps(self) -> dict[str, int]:
        """Adam's step count per parameter that has a state. They differ when some parameters
        are not trained every step (fine-tuning several tasks: a head steps with its task)."""
        out = {}
        for name, p in self.pm.named_parameters():
            st = self.optimizer.state.get(p, {})
            if "step" in st:
                out[name] = int(st["step"])
        return out

    def adam_step(self) -> int:
        return max(self.adam_steps().values(), default=0)

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_step: int,
                           adam_steps: dict[str, int] | None = None) -> None:
        """`adam_steps`: per-parameter step counts that differ from `adam_step`."""
        adam_steps = adam_steps or {}
        for name, p in self.pm.named_parameters():
            if f"exp_avg/{name}" not in tensors:
                continue
            st = self.optimizer.state[p]
            for key in ADAM_STATES:
                st[key] = tensors[f"{key}/{name}"].to(device=p.device, dtype=p.dtype).clone()
            st["step"] = torch.tensor(float(adam_steps.get(name, adam_step)))

    def master_params(self) -> dict[str, torch.Tensor] | None:
        return None  # the model's fp32 parameters are the master weights

    def load_master_params(self, tensors) -> None:
        pass


class ZeroOptimizer(PlainOptimizer):
    def __init__(self, pm: nn.Module, cfg):
        self.pm, self.cfg, self.zero_stage = pm, cfg.train, cfg.zero.stage
        t = cfg.train
        self.engine, self.optimizer = zero.init_engine(
            pm, build_adamw(pm, t.lr, t.weight_decay, t.betas),
            zero.deepspeed_config(cfg.zero.stage, t.grad_clip, cfg.zero.config),
        )

    def step(self, micro_batches: list[dict], autocast) -> tuple[float, float, float, bool]:
        with self.engine.coalesce_grad_reduction(), autocast():
            loss_sum, weight_sum = self.pm.forward_backward(micro_batches, reduce_dp_cp=False, grad_reduction="mean")
        finite = math.isfinite(loss_sum.item())
        if finite:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            self.engine.zero_grad()
            norm = float("nan")
        return loss_sum.item(), weight_sum.item(), norm, finite

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.pm.named_parameters():
            for key in ADAM_STATES:
                out[f"{key}/{name}"] = zero.full_tensor(self.optimizer, p, key).cpu()
        return out

    def adam_steps(self) -> dict[str, int]:
        step = zero.adam_step(self.optimizer)  # one count for every partition
        return {name: step for name, _ in self.pm.named_parameters()} if step else {}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_step: int,
                           adam_steps: dict[str, int] | None = None) -> None:
        if adam_steps:
            raise ValueError(f"this checkpoint's parameters have different Adam step counts ({len(adam_steps)} "
                             "differ); ZeRO keeps one per partition: resume it with zero.stage=0")
        zero.ensure_adam_states(self.optimizer, adam_step)
        for name, p in self.pm.named_parameters():
            for key in ADAM_STATES:
                zero.set_partition(self.optimizer, p, tensors[f"{key}/{name}"], key)

    def master_params(self) -> dict[str, torch.Tensor] | None:
        return {name: zero.full_tensor(self.optimizer, p, None).cpu() for name, p in self.pm.named_parameters()}

    @torch.no_grad()
    def load_master_params(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.pm.named_parameters():
            zero.set_partition(self.optimizer, p, tensors[name], None)
        zero.publish_master_params(self.optimizer)


def build_optimizer(pm: nn.Module, cfg):
    return PlainOptimizer(pm, cfg.train) if cfg.zero.stage == 0 else ZeroOptimizer(pm, cfg)
