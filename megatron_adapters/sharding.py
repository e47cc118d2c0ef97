"""The sharding plan: which slice of each canonical parameter a rank holds.

One rule set, keyed by the parameter's canonical (single-device) name, serves three
users: building (draw the full tensor, keep the slice), `shard_state_dict` (offline, no
process groups) and `gather_full_state_dict` (concatenate slices back). Only tensor
parallelism slices parameters; context and data parallelism replicate them and pipeline
parallelism picks which layers a rank holds (see parallel_config.stage_layers).

TP splits are contiguous along one dim, which is what megatron-core's Column/Row parallel
layers and VocabParallelEmbedding do. A block's mixer parameters split as its layer kind
declares (`LayerKind.tp_split` in hyena_glt/kinds.py: the Hyena projections, featurizer and
filters on their channel dim, attention's qkv rows and output columns); the rules below
cover what every block and model has besides (MLP, vocabulary). Contiguous works for the
Hyena projections because their rows are laid out (group, channel, x1|x2|v): rank r gets
whole groups [r*G/tp, (r+1)*G/tp), and the featurizer, filter and skip rows follow the same
channel order.
"""

from __future__ import annotations

import re

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from hyena_glt import params
from hyena_glt.kinds import mixer_tp_split

_MIXER = ".mixer."

# (regex on the canonical name, dim split across TP ranks) for everything but the mixers
_MODEL_TP_RULES: list[tuple[re.Pattern, int]] = [
    # column parallel: output rows
    (re.compile(r"\.mlp\.(gate_proj|up_proj)\.weight$"), 0),
    # row parallel: input columns
    (re.compile(r"\.mlp\.down_proj\.weight$"), 1),
    # vocab parallel
    (re.compile(r"^model\.embed\.weight$"), 0),
    (re.compile(r"^lm_head\.weight$"), 0),
]


def tp_split_dim(name: str) -> int | None:
    """Dim along which `name` is split across TP ranks, or None if every TP rank holds all of it."""
    _, mixer, inside = name.rpartition(_MIXER)
    if mixer:
        return mixer_tp_split().get(inside)
    for pattern, dim in _MODEL_TP_RULES:
        if pattern.search(name):
            return dim
    return None


def tp_slice(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by tp={tp}")
    return full.chunk(tp, dim=dim)[tp_rank]


def tp_concat(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim=dim)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Global layer index of a canonical name, None for embedding / head / final norm."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def held_by_stage(name: str, layers: set[int], first: bool, last: bool, tied: bool) -> bool:
    """Does a pipeline stage holding `layers` (and the embedding if first, the head if last)
    hold parameter `name`? A tied last stage keeps its own copy of the embedding."""
    if first and last:  # a single stage holds everything
        return True
    idx = layer_index(name)
    if idx is not None:
        return idx in layers
    if name == "model.embed.weight":
        return first or (last and tied)
    if name.startswith(("model.seq_type_embed.", "model.motif.")):
        return first
    # the token-merging U-shape: bytes are encoded and merged on the first stage, unmerged
    # and decoded on the last; the segment encodings serve both
    if name.startswith(("model.encoder.", "model.patcher.", "model.positions.pool.")):
        return first
    if name.startswith(("model.positions.unpool.", "model.global_norm.", "model.decoder.")):
        return last
    if name.startswith("model.positions."):
        return first or last
    if name.startswith("model.final_norm.") or name.startswith("lm_head."):
        return last
    raise KeyError(f"{name}: no pipeline placement rule for this parameter")


def canonical_params(cfg) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the single-device model (name -> parameter carrying init_fn,
    no_weight_decay and the full shape), built on the meta device: no memory, no init."""
    return dict(_meta_model(cfg).named_parameters())


def canonical_state(cfg) -> dict[str, torch.Tensor]:
    """canonical_params plus the persistent buffers (what a checkpoint holds), on meta."""
    model = _meta_model(cfg)
    return {**dict(model.named_parameters()), **dict(named_persistent_buffers(model))}


def _meta_model(cfg) -> nn.Module:
    from hyena_glt.registry import build_causal_lm

    with torch.device("meta"):
        return build_causal_lm(cfg, initialize=False)


@torch.no_grad()
def init_from_canonical(modules: list[nn.Module], cfg, ctx) -> None:
    """Fill every parameter of this rank's modules with its slice of the full single-device
    initial value (drawn from the parameter's own init rule, seeded by its canonical name)."""
    template = canonical_params(cfg)
    for module in modules:
        for name, p in module.named_parameters():
            if name not in template:
                raise KeyError(f"{name}: parallel parameter has no single-device counterpart")
            t = template[name]
            local = tp_slice(name, params.full_init(t, name, cfg.seed, tuple(t.shape)), ctx.coords.tp, ctx.tp)
            if tuple(local.shape) != tuple(p.shape):
                raise ValueError(f"{name}: sharding rule gives {tuple(local.shape)}, module holds {tuple(p.shape)}")
            p.copy_(local.to(p.dtype))
            p.no_weight_decay = t.no_weight_decay
            # megatron only tags the weights it initialises itself; its grad-norm and checkpoint
            # utilities need the tag on every TP-sharded parameter, and nothing else.
            dim = tp_split_dim(name)
            set_tensor_model_parallel_attributes(p, dim is not None and ctx.tp > 1, dim or 0, 1)


def named_persistent_buffers(module: nn.Module, prefix: str = ""):
    """(name, tensor) of the buffers a state dict holds (not the non-persistent ones)."""
    for mod_name, mod in module.named_modules(prefix=prefix):
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{n}" if mod_name else n), b
