"""Between the full single-device state dict and each rank's shard.

* `shard_state_dict(full_state, layout, rank)`: offline, no process group needed: the
  canonical-name -> tensor dict this rank's ParallelModel.load_state_dict expects.
* `gather_full_state_dict(model)`: collective over all ranks: TP slices concatenated,
  pipeline stages collected; returns the single-device state dict (on CPU) on every rank,
  loadable by HyenaGLTForCausalLM.load_state_dict. `grads=True` gathers gradients instead.

Keys are canonical single-device names everywhere (global layer indices), so checkpoints
move between layouts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .build import ParallelModel
from .parallel_config import Layout
from .sharding import canonical_params, canonical_state, held_by_stage, tp_concat, tp_slice, tp_split_dim


def _check_full(full_state: dict[str, torch.Tensor], layout: Layout) -> None:
    template = canonical_state(layout.model)
    missing = sorted(set(template) - set(full_state))
    unexpected = sorted(set(full_state) - set(template))
    shapes = [
        f"{k}: {tuple(full_state[k].shape)} vs {tuple(template[k].shape)}"
        for k in sorted(set(template) & set(full_state))
        if tuple(full_state[k].shape) != tuple(template[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"state dict does not match the model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}"
        )


def shard_state_dict(full_state: dict[str, torch.Tensor], layout: Layout, rank: int) -> dict[str, torch.Tensor]:
    """The part of a full single-device state dict that global `rank` holds in `layout`."""
    _check_full(full_state, layout)
    pcfg = layout.parallel
    coords = layout.coords(rank)
    stages = layout.stage_layers()
    last = pcfg.num_stages - 1
    mine = layout.chunk_stages(coords.pp)
    out: dict[str, torch.Tensor] = {}
    for name, t in full_state.items():
        if any(
            held_by_stage(name, set(stages[s]), first=s == 0, last=s == last, tied=layout.model.tie_embeddings)
            for s in mine
        ):
            out[name] = tp_slice(name, t, coords.tp, pcfg.tp).clone()
    return out


@torch.no_grad()
def gather_full_state_dict(model: ParallelModel, grads: bool = False) -> dict[str, torch.Tensor]:
    """Collective (every rank must call it): the full single-device state dict on every rank.
    Data- and context-parallel replicas are identical, so only TP and PP are gathered."""
    ctx = model.ctx
    local: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        local[name] = (torch.zeros_like(p) if t is None else t).detach()

    # 1. TP: concatenate slices (every TP rank of a stage holds the same names, same order).
    if ctx.tp > 1:
        for name, t in local.items():
            if tp_split_dim(name) is not None:
                parts = [torch.empty_like(t) for _ in range(ctx.tp)]
                dist.all_gather(parts, t.contiguous(), group=ctx.tp_group)
                local[name] = tp_concat(name, parts)

    # 2. PP: every stage broadcasts its tensors to the others in its pipeline group.
    full: dict[str, torch.Tensor] = {}
    if ctx.pcfg.pp == 1:
        full = {n: t.cpu() for n, t in local.items()}
    else:
        meta = [(n, tuple(t.shape), t.dtype) for n, t in local.items()]
        metas: list = [None] * ctx.pcfg.pp
        dist.all_gather_object(metas, meta, group=ctx.pp_group)
        ranks = dist.get_process_group_ranks(ctx.pp_group)
        for src, src_meta in enumerate(metas):
            for name, shape, dtype in src_meta:
                if src == ctx.coords.pp:
                    buf = local[name].contiguous()
                else:
                    buf = torch.empty(shape, dtype=dtype, device=model.device)
                dist.broadcast(buf, src=ranks[src], group=ctx.pp_group)
                full.setdefault(name, buf.cpu())  # a tied embedding copy: keep the first stage's
    missing = sorted(set(canonical_params(model.config)) - set(full))
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:5]}")
    return full
