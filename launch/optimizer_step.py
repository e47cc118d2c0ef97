"""The optimizer side of a training step, plain or through DeepSpeed ZeRO.

Both variants take the model's gradients as `ParallelModel.forward_backward` leaves them
and expose the same small surface to the trainer: `step(micro_batches)`, `set_lr`, and
full (unpartitioned over data parallel) optimizer states per parameter for checkpoints,
so a checkpoint does not depend on the data-parallel size or the ZeRO stage.

* `PlainOptimizer` (zero.stage 0): gradients are summed over DP x CP by forward_backward;
  the global gradient norm is computed here (each parameter counted once across TP and
  pipeline stages) and clipped; torch AdamW steps.
* `ZeroOptimizer` (stages 1-3): DeepSpeed owns the DP x CP reduction. Our backward (which
  the megatron-core pipeline schedules run with plain autograd) happens inside
  `engine.coalesce_grad_reduction()`, so ZeRO's per-parameter hooks stay quiet and one
  reduction pass runs at the end; DeepSpeed averages over its data-parallel group (DP x CP
  here), so forward_backward scales the loss by that group's size (`grad_reduction="mean"`).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_adapters.build import ParallelModel
from megatron_adapters.sharding import tp_split_dim

from .optim import param_groups

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _counted_once(name: str, p: torch.nn.Parameter) -> bool:
    """Whether this rank's copy of `name` enters the global grad norm: TP-sharded slices
    always; TP-replicated tensors on TP rank 0 only; the tied output-weight copy on the last
    pipeline stage never (the first stage holds the embedding)."""
    if getattr(p, "shared_embedding", False) and ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_first_stage(ignore_virtual=True):
            return False
    return tp_split_dim(name) is not None or ps.get_tensor_model_parallel_rank() == 0


def global_grad_norm(pm: ParallelModel) -> torch.Tensor:
    sq = torch.zeros((), dtype=torch.float64, device=pm.device)
    for name, p in pm.named_parameters():
        if p.grad is not None and _counted_once(name, p):
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


class PlainOptimizer:
    zero_stage = 0

    def __init__(self, pm: ParallelModel, train_cfg):
        self.pm, self.cfg = pm, train_cfg
        self.optimizer = torch.optim.AdamW(
            param_groups(pm, train_cfg.weight_decay), lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=1e-8
        )

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, micro_batches: list[dict], autocast) -> tuple[float, float, float, bool]:
        """forward+backward+clip+step. Returns (loss_sum, weight_sum, grad_norm, stepped)."""
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

    def adam_step(self) -> int:
        steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
        return max(steps) if steps else 0

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
        for name, p in self.pm.named_parameters():
            if f"exp_avg/{name}" not in tensors:
                continue
            st = self.optimizer.state[p]
            for key in ADAM_STATES:
                st[key] = tensors[f"{key}/{name}"].to(device=p.device, dtype=p.dtype).clone()
            st["step"] = torch.tensor(float(adam_step))

    def master_params(self) -> dict[str, torch.Tensor] | None:
        return None  # the model's fp32 parameters are the master weights

    def load_master_params(self, tensors) -> None:
        pass


class _MPU:
    """What DeepSpeed asks of an `mpu`, answered from megatron-core's groups.

    DeepSpeed's data-parallel group must be DP x CP: context-parallel ranks hold replicated
    parameters whose gradients differ per rank. Its "model parallel" rank decides who counts
    TP-replicated tensors in the grad norm (TP rank), and the norm is summed over TP x PP.
    """

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return ps.get_model_parallel_group().size()

    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return ps.get_pipeline_model_parallel_rank()


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed config generated from ours (or cfg.zero.config, a JSON file, if given).
    Gradient accumulation is ours (forward_backward runs every micro-batch), so DeepSpeed
    sees one micro-step per optimizer step."""
    if cfg.zero.config:
        path = Path(cfg.zero.config)
        if not path.is_file():
            raise FileNotFoundError(f"zero.config: {path} does not exist")
        ds = json.loads(path.read_text())
    else:
        ds = {}
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.zero.stage
    # DeepSpeed only books these; the real batch is cut by our loader. One "micro-batch" per
    # rank per step keeps its accounting consistent with one backward per step.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = dp_cp
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class ZeroOptimizer(PlainOptimizer):
    def __init__(self, pm: ParallelModel, cfg):
        if not torch.cuda.is_available():
            # DeepSpeed JIT-builds a shared-memory comm op with g++ on first CPU init (~80 s);
            # gloo does the same job here.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        self.pm, self.cfg, self.zero_stage = pm, cfg.train, cfg.zero.stage
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        client = torch.optim.AdamW(
            param_groups(pm, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=1e-8
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=pm, optimizer=client, config=deepspeed_config(cfg), mpu=_MPU(), dist_init_required=False
        )
        if self.zero_stage == 3:
            _register_external_parameters(pm)

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
                out[f"{key}/{name}"] = _full_zero_tensor(self.optimizer, p, key).cpu()
        return out

    def adam_step(self) -> int:
        base = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        steps = [int(st["step"]) for st in base.state.values() if "step" in st]
        return max(steps) if steps else 0

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
        if self.zero_stage == 3:
            raise ValueError("resuming optimizer states under zero.stage=3 is not supported; resume with stage 1 or 2 "
                             "(checkpoints are stage-independent) or set checkpoint.resume=false")
        # Adam state exists only after a first step: create it on the flat fp32 partitions.
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                st = base.state[flat]
                for key in ADAM_STATES:
                    st.setdefault(key, torch.zeros_like(flat))
                st["step"] = torch.tensor(float(adam_step))
        for name, p in self.pm.named_parameters():
            for key in ADAM_STATES:
                self._set_fragment(p, tensors[f"{key}/{name}"], key)

    def _set_fragment(self, p, full: torch.Tensor, key: str | None) -> None:
        frag = _zero12_fragment(self.optimizer, p, key)
        if frag is not None:
            addr = p._hp_mapping.lp_fragment_address
            frag.copy_(full.to(frag.device, torch.float32).flatten().narrow(0, addr.start, addr.numel))

    def master_params(self) -> dict[str, torch.Tensor] | None:
        return {name: _full_zero_tensor(self.optimizer, p, None).cpu() for name, p in self.pm.named_parameters()}

    @torch.no_grad()
    def load_master_params(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3:
            from deepspeed.utils import safe_set_full_fp32_param

            for name, p in self.pm.named_parameters():
                safe_set_full_fp32_param(p, tensors[name].to(self.pm.device))
            return
        for name, p in self.pm.named_parameters():
            self._set_fragment(p, tensors[name], None)


def _zero12_fragment(opt, p: torch.nn.Parameter, key: str | None) -> torch.Tensor | None:
    """This rank's piece of a parameter's fp32 master value (key None) or Adam state inside
    ZeRO-1/2's flat partition, read straight from the base optimizer's state (the per-
    parameter `optim_fragment` links DeepSpeed builds lazily can be missing)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    flat = opt.single_partition_of_fp32_groups[mapping.param_group_index]
    source = flat if key is None else opt.optimizer.state.get(flat, {}).get(key)
    if source is None:
        return None
    addr = mapping.hp_fragment_address
    return source.narrow(0, addr.start, addr.numel)


def _full_zero_tensor(opt, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """A parameter's full fp32 master value or Adam state, gathered over ZeRO's data-parallel
    group (collective: every rank calls it for every parameter, in the same order)."""
    if hasattr(p, "ds_id"):  # ZeRO-3 keeps its own partition bookkeeping
        return p._z3_optimizer.get_full_hp_param(p, key).detach()
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    frag = _zero12_fragment(opt, p, key)
    if frag is not None:
        addr = p._hp_mapping.lp_fragment_address
        buf.narrow(0, addr.start, addr.numel).copy_(frag)
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view_as(p)


def _register_external_parameters(pm: ParallelModel) -> None:
    """ZeRO-3 gathers a parameter only around its own module's forward. Parameters used by
    another module (the tied output layer reads the embedding weight; the first stage reads
    the sequence-type table and motif filters directly) must be registered with that module."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for chunk in pm.chunks:
        model = chunk.model
        if getattr(chunk, "tied", False) and hasattr(chunk, "output_layer"):
            register_external_parameter(chunk.output_layer, model.embed.weight)
        if hasattr(model, "seq_type_embed"):
            register_external_parameter(chunk, model.seq_type_embed.weight)
        if hasattr(model, "motif"):
            for h in model.motif.filters:
                register_external_parameter(chunk, h)


def build_optimizer(pm: ParallelModel, cfg):
    return PlainOptimizer(pm, cfg.train) if cfg.zero.stage == 0 else ZeroOptimizer(pm, cfg)

