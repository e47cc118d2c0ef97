"""Everything that touches DeepSpeed internals, in one module.

launch/training/optimizer.py (ZeroOptimizer) and launch/checkpoint/ call the small functions
below; nothing else in the project reaches into DeepSpeed's engine, its flat ZeRO-1/2
partitions (`_hp_mapping`, `single_partition_of_fp32_groups`) or ZeRO-3's partitioned
parameters (`ds_id`, `_z3_optimizer`). DeepSpeed is imported lazily, so importing this
module costs nothing for runs without ZeRO.

Checkpoints hold full (unpartitioned over data parallel) fp32 master weights and Adam states
per canonical parameter name, so `full_tensor` gathers a parameter's pieces over ZeRO's
data-parallel group and `set_partition` writes this rank's piece back.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def is_zero3_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 holds `p` partitioned (its local data is not the full tensor)."""
    return hasattr(p, "ds_id")


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


def deepspeed_config(stage: int, grad_clip: float, config_file: str | None = None) -> dict:
    """The DeepSpeed config for a ZeRO stage (or `config_file`, a JSON file, as the base).
    Gradient accumulation is ours (forward_backward runs every micro-batch), so DeepSpeed
    sees one micro-step per optimizer step."""
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"zero.config: {path} does not exist")
        ds = json.loads(path.read_text())
    else:
        ds = {}
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    ds.setdefault("zero_optimization", {})["stage"] = stage
    # DeepSpeed only books these; the real batch is cut by our loader. One "micro-batch" per
    # rank per step keeps its accounting consistent with one backward per step.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = dp_cp
    ds["gradient_clipping"] = grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def init_engine(model: nn.Module, client_optimizer: torch.optim.Optimizer, ds_config: dict):
    """deepspeed.initialize on megatron-core's groups -> (engine, ZeRO optimizer). Under
    ZeRO-3 the parameters a module reads from another module are registered with it."""
    if not torch.cuda.is_available():
        # DeepSpeed JIT-builds a shared-memory comm op with g++ on first CPU init (~80 s);
        # gloo does the same job here.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=client_optimizer, config=ds_config, mpu=_MPU(), dist_init_required=False
    )
    if ds_config["zero_optimization"]["stage"] == 3:
        _register_external_parameters(model)
    return engine, optimizer


def adam_step(optimizer) -> int:
    """The Adam step count of a ZeRO optimizer (the same for every partition)."""
    base = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    steps = [int(st["step"]) for st in base.state.values() if "step" in st]
    return max(steps) if steps else 0


def ensure_adam_states(optimizer, step: int) -> None:
    """Create Adam states (zeros) on ZeRO's flat fp32 partitions and set their step: they
    exist only after a first optimizer step, and a resume fills them before it. ZeRO-1/2 keep
    their partitions in the base optimizer's param groups; ZeRO-3 hands each sub-group's
    partition to the base optimizer only while it steps, so they are read from its list."""
    if getattr(optimizer, "swap_optimizer", False):
        raise ValueError("resuming optimizer states into a ZeRO-3 optimizer offloaded to NVMe is not supported; resume "
                         "without NVMe offload in zero.config, or with checkpoint.fresh_optimizer=true")
    base = optimizer.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        flats = list(optimizer.fp32_partitioned_groups_flat)
    else:
        flats = [flat for group in base.param_groups for flat in group["params"]]
    for flat in flats:
        st = base.state[flat]
        for key in ADAM_STATES:
            st.setdefault(key, torch.zeros_like(flat))
        st["step"] = torch.tensor(float(step))


def _zero12_fragment(optimizer, p: torch.nn.Parameter, key: str | None) -> torch.Tensor | None:
    """This rank's piece of a parameter's fp32 master value (key None) or Adam state inside
    ZeRO-1/2's flat partition, read straight from the base optimizer's state (the per-
    parameter `optim_fragment` links DeepSpeed builds lazily can be missing)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    flat = optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
    source = flat if key is None else optimizer.optimizer.state.get(flat, {}).get(key)
    if source is None:
        return None
    addr = mapping.hp_fragment_address
    return source.narrow(0, addr.start, addr.numel)


def full_tensor(optimizer, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """A parameter's full fp32 master value (key None) or Adam state (`exp_avg`, `exp_avg_sq`),
    gathered over ZeRO's data-parallel group (collective: every rank calls it for every
    parameter, in the same order)."""
    if is_zero3_partitioned(p):  # ZeRO-3 keeps its own partition bookkeeping
        return p._z3_optimizer.get_full_hp_param(p, key).detach()
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    frag = _zero12_fragment(optimizer, p, key)
    if frag is not None:
        addr = p._hp_mapping.lp_fragment_address
        buf.narrow(0, addr.start, addr.numel).copy_(frag)
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view_as(p)


@torch.no_grad()
def set_partition(optimizer, p: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """Write this rank's piece of a parameter's full fp32 master value (key None) or Adam state
    into ZeRO's partition (not collective: each rank takes its own piece of `full`)."""
    if is_zero3_partitioned(p):
        _set_zero3_partition(p, full, key)
        return
    frag = _zero12_fragment(optimizer, p, key)
    if frag is not None:
        addr = p._hp_mapping.lp_fragment_address
        frag.copy_(full.to(frag.device, torch.float32).flatten().narrow(0, addr.start, addr.numel))


def _set_zero3_partition(p: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """ZeRO-3: rank r of the parameter's partition group holds elements [r*n, (r+1)*n) of the
    flattened parameter, the last one padded. DeepSpeed's own set_full_hp_param reads past
    the end for that padded piece, so the piece is cut here (the padding stays zero)."""
    z3 = p._z3_optimizer
    if not p.requires_grad:
        return
    part, _ = z3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), z3._get_param_partition_rank(p)
    flat = full.detach().to(part.device, torch.float32).flatten()
    take = max(0, min(n, flat.numel() - n * rank))
    part.narrow(0, 0, take).copy_(flat.narrow(0, n * rank, take))
    part.narrow(0, take, n - take).zero_()


@torch.no_grad()
def publish_master_params(optimizer) -> None:
    """After set_partition wrote master values (collective under ZeRO-3): what DeepSpeed does
    after its own optimizer step. ZeRO-3 computes with the parameters' own partitions (copied
    from the fp32 ones) and keeps small "persistent" parameters gathered whole on every rank;
    without this the next forward would use the weights from before the load. Under ZeRO-1/2
    every rank holds whole parameters, which the caller sets directly (set_model_weights)."""
    if not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return
    for sub_group in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    optimizer.checkpoint_event_epilogue()


def _register_external_parameters(pm: nn.Module) -> None:
    """ZeRO-3 gathers a parameter only around its own module's forward. Parameters used by
    another module must be registered with that module: the tied output layer reads the
    embedding weight; the first stage reads the sequence-type table and motif filters
    directly; a Hyena operator hands its featurizer's and filter's taps to the spec's
    convolutions (hyena_glt/spec.py) instead of calling those modules."""
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
        for module in chunk.modules():
            for part in ("featurizer", "filter"):
                sub = getattr(module, part, None)
                if isinstance(sub, nn.Module):
                    for p in sub.parameters():
                        register_external_parameter(module, p)
