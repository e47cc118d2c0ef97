"""Build this rank's share of the model for a layout, and its forward/backward step.

The model is hyena_glt's own, built with the parallel spec (spec.py): a pipeline rank
holds one `Stage` of its causal LM per (virtual) stage, each wrapped for megatron's
schedules by `PipelineStage`: HyenaGLTForCausalLM, or for a token-merging config the
U-shaped BLTForCausalLM (byte encoder and merge on the first stage, unmerge, byte decoder
and output on the last; merging.py).

    layout = initialize_parallel(ParallelConfig(tp=2, pp=2), cfg, seq_length=L)
    pm = build_parallel_model(cfg, layout, dtype=torch.float32)
    loss_sum, weight_sum = pm.forward_backward(micro_batches)   # grads now in p.grad
    loss = loss_sum / weight_sum

Weights: each parameter is drawn in full from the single-device init rule (seeded by the
config seed and its canonical name) and sliced, so any layout starts from the weights of
`HyenaGLTForCausalLM(cfg)`.

Loss and gradients: the global objective is sum(w * CE) / sum(w) over all micro-batches of
all data-parallel ranks. The denominator only needs the loss weights, so it is all-reduced
over DP x CP *before* the forward; each rank then back-propagates its local sum divided by
it, and summing gradients over DP x CP (grads.reduce_gradients_dp_cp) gives exactly the
single-device gradient. The result does not depend on how the batch is split.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core.enums import ModelType
from torch import nn

from hyena_glt.config import PATCHING_NONE, HyenaGLTConfig
from hyena_glt.loss import default_loss_weights
from hyena_glt.model import HyenaGLTForCausalLM, Stage
from hyena_glt.blt.ushape import BLTForCausalLM
from hyena_glt.registry import family_of

from . import context_parallel as cpar
from . import merging
from . import sequence_parallel as spar
from .grads import finalize_model_parallel_grads, reduce_gradients_dp_cp
from .groups import RankContext, parallel_device
from .parallel_config import Layout, check_layout
from .pipeline import check_num_microbatches, run_schedule
from .sharding import held_by_stage, init_from_canonical, named_persistent_buffers
from .spec import parallel_spec
from .tensor_parallel import megatron_config, vocab_parallel_cross_entropy


def localize_batch(mb: dict, ctx: RankContext, device: torch.device, merging: bool = False) -> dict:
    """A full micro-batch (B, L) -> what this rank computes on: its zigzag CP share, labels and
    weights sequence-first (s_cp, B), global positions, conservation sliced for SP. With
    `merging` also the whole ids, conservation, labels and weights (the U-shape's patcher and
    bridge see whole sequences and share them out themselves; merging.py)."""
    if mb.get("position_ids") is not None:
        raise NotImplementedError("custom position_ids are not supported by the parallel model (positions are 0..L-1)")
    ids = mb["input_ids"]
    L = ids.shape[1]
    cp, r = ctx.cp, ctx.coords.cp
    out = {
        "input_ids": cpar.zigzag_slice(ids, cp, r).to(device),
        "positions": (cpar.zigzag_positions(L, cp, r) if cp > 1 else torch.arange(L)).to(device),
    }
    labels = mb.get("labels")
    if labels is not None:
        weights = mb.get("loss_weights")
        if weights is None:
            weights = default_loss_weights(labels)
        out["labels"] = cpar.zigzag_slice(labels.clamp_min(0), cp, r).t().contiguous().to(device)
        out["loss_weights"] = cpar.zigzag_slice(weights, cp, r).t().contiguous().to(device)
        if merging:
            out["whole_labels"], out["whole_loss_weights"] = labels.to(device), weights.to(device)
    if mb.get("seq_type") is not None:
        out["seq_type"] = mb["seq_type"].to(device)
    if merging:
        out["whole_input_ids"] = ids.to(device)
        if mb.get("conservation") is not None:
            out["whole_conservation"] = mb["conservation"].to(device)
    elif mb.get("conservation") is not None:
        c = cpar.zigzag_slice(mb["conservation"], cp, r).t().contiguous()
        out["conservation"] = spar.local_rows(c, ctx.tp, ctx.coords.tp, ctx.sp).contiguous().to(device)
    return out


class PipelineStage(nn.Module):
    """One (virtual) pipeline stage of a causal LM (HyenaGLTForCausalLM, or the token-merging
    BLTForCausalLM: merging.run_stage) as megatron's schedules drive it.

    It registers the stage model's parts (`model`, `output_layer`, `lm_head`) as its own, so
    parameter names stay canonical (`model.layers.5.mixer...`). Forward takes the
    rank-local micro-batch (see localize_batch) and returns the hidden states (s, B, D)
    for the next stage, or vocab-sharded logits (s_cp, B, V/tp) on the last. `config` is
    the megatron config (the schedules read it from there); the model's is `hyena_config`.
    """

    model_type = ModelType.encoder_or_decoder

    def __init__(self, lm: HyenaGLTForCausalLM | BLTForCausalLM, mcfg, ctx: RankContext, vp_stage: int | None = None):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.__dict__["lm"] = lm  # not a child: its parts are registered above
        self.config, self.hyena_config, self.ctx = mcfg, lm.config, ctx
        self.merging = lm.config.patching != PATCHING_NONE
        self.tied = lm.config.tie_embeddings
        self.is_first, self.is_last = lm.stage.first, lm.stage.last
        if vp_stage is not None:
            self.vp_stage = vp_stage
        self._input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's schedules with the activation received from the previous stage."""
        self._input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.model.activation_checkpointing = enabled

    def forward(self, batch: dict) -> torch.Tensor:
        if self.merging:
            return merging.run_stage(self, batch)
        out = self.lm(batch["input_ids"] if self.is_first else None, seq_type=batch.get("seq_type"),
                      conservation=batch.get("conservation"), position_ids=batch["positions"],
                      hidden=None if self.is_first else self._input_tensor)
        # A task micro-batch (co-training, task_heads.py) ends at the final hidden states, which its head reads.
        return out.logits if self.is_last and "task" not in batch else out.hidden_states


class ParallelModel(nn.Module):
    """This rank's model chunks (one, or `vpp` for interleaved pipelining) and the step.

    `named_parameters()` / `state_dict()` use canonical single-device names (global layer
    indices) with this rank's TP slice as the value.
    """

    def __init__(self, chunks: list[PipelineStage], ctx: RankContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.ctx, self.dtype, self.device = ctx, dtype, device
        self.config: HyenaGLTConfig = ctx.layout.model

    @property
    def layout(self) -> Layout:
        return self.ctx.layout

    @property
    def holds_loss(self) -> bool:
        return any(c.is_last for c in self.chunks)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        seen = set()
        for c in self.chunks:
            for name, p in c.named_parameters(prefix=prefix, recurse=recurse):
                if id(p) not in seen or not remove_duplicate:
                    seen.add(id(p))
                    yield name, p

    def named_persistent_buffers(self):
        for c in self.chunks:
            yield from named_persistent_buffers(c)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {n: p.detach() for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, shard: dict[str, torch.Tensor], strict: bool = True):  # type: ignore[override]
        """Load this rank's shard (as made by state_dict.shard_state_dict)."""
        mine = dict(self.named_parameters())
        missing = sorted(set(mine) - set(shard))
        unexpected = sorted(set(shard) - set(mine))
        if strict and (missing or unexpected):
            raise KeyError(f"shard does not fit this rank: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for n, p in mine.items():
            if n in shard:
                if tuple(shard[n].shape) != tuple(p.shape):
                    raise ValueError(f"{n}: shard shape {tuple(shard[n].shape)} != local {tuple(p.shape)}")
                p.copy_(shard[n].to(p.dtype))
        return None

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for c in self.chunks:
            c.set_activation_checkpointing(enabled)

    def chunk_list(self) -> list[PipelineStage]:
        return list(self.chunks)

    # ------------------------------------------------------------------ the step
    def forward_backward(
        self,
        micro_batches: list[dict],
        *,
        forward_only: bool = False,
        reduce_dp_cp: bool = True,
        grad_reduction: str = "sum",
        logits_out: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this DP rank's micro-batches; gradients accumulate in `.grad`
        (zero them before). Returns (loss_sum, weight_sum), the global sums over every
        micro-batch of every DP rank, identical on all ranks: loss = loss_sum / weight_sum.

        micro_batches: dicts of full-length (B, L) tensors: input_ids, labels (already
        shifted), loss_weights (optional: default weights), seq_type (B,), conservation (B, L).
        Every CP and TP rank of a DP rank passes the same micro-batches; slicing is done here.
        reduce_dp_cp: False leaves the DP x CP gradient sum to an outer engine (ZeRO): call
        grads.reduce_gradients_dp_cp yourself or let the engine reduce over the DP x CP group.
        grad_reduction: "sum" (our reduction) or "mean" when the engine *averages* over the
        DP x CP group: the local loss is then multiplied by dp*cp so the average is exact.
        logits_out: if a list, the last pipeline stage appends each micro-batch's full
        logits (B, L, V) (gathered over TP and CP); other stages leave it empty.
        """
        if grad_reduction not in ("sum", "mean"):
            raise ValueError(f"grad_reduction must be 'sum' or 'mean', got {grad_reduction!r}")
        ctx, pcfg = self.ctx, self.ctx.pcfg
        check_num_microbatches(len(micro_batches), pcfg.pp, pcfg.vpp)
        B, L = micro_batches[0]["input_ids"].shape
        if any(tuple(mb["input_ids"].shape) != (B, L) for mb in micro_batches):
            raise ValueError("all micro-batches must have the same (batch, length) shape")
        check_layout(pcfg, self.config, seq_length=L)
        is_merging = self.config.patching != PATCHING_NONE
        local = [localize_batch(mb, ctx, self.device, is_merging) for mb in micro_batches]

        compute = torch.promote_types(self.dtype, torch.float32)
        weight_sum = torch.zeros((), dtype=compute, device=self.device)
        for lb in local:
            if "loss_weights" in lb:
                weight_sum += lb["loss_weights"].to(compute).sum()
        dist.all_reduce(weight_sum, group=ctx.dp_cp_group)
        scale = (ctx.dp_cp_group.size() if grad_reduction == "mean" else 1.0) / weight_sum.clamp_min(1e-8)
        keep_logits = logits_out is not None
        seq_length = L
        if is_merging:
            for lb in local:
                lb["loss_scale"] = scale  # the patcher's loss terms join the backward on the first stage
            seq_length = merging.StageRows(self.chunks[0].lm, ctx, L).seq_length

        def loss_func(lb: dict, logits: torch.Tensor):
            if "labels" in lb:
                ce = vocab_parallel_cross_entropy(logits, lb["labels"])  # (s_cp, B), same on all TP ranks
                loss_sum = (ce * lb["loss_weights"].to(ce.dtype)).sum()
                n_tokens = (lb["loss_weights"] > 0).sum().to(torch.int)
            else:  # logits only (a probe batch without targets)
                loss_sum, n_tokens = logits.sum() * 0, torch.zeros((), dtype=torch.int, device=logits.device)
            info = {"loss_sum": loss_sum.detach()}
            if keep_logits:
                info["logits"] = logits.detach()
            return loss_sum * scale, n_tokens, info

        def forward_step(data_iterator, chunk):
            lb = next(data_iterator)
            return chunk(lb), partial(loss_func, lb)

        store = run_schedule(
            self.chunk_list(), local, forward_step, seq_length=seq_length, micro_batch_size=B, forward_only=forward_only
        )
        loss_sum = torch.zeros((), dtype=compute, device=self.device)
        if self.holds_loss:
            for info in store:
                loss_sum += info["loss_sum"].to(compute)
        if pcfg.pp > 1:  # only the last stage has it; hand it to every stage
            dist.all_reduce(loss_sum, group=ctx.pp_group)
        dist.all_reduce(loss_sum, group=ctx.dp_cp_group)

        if not forward_only:
            finalize_model_parallel_grads(self.chunk_list())
            if reduce_dp_cp:
                reduce_gradients_dp_cp(self.chunk_list())
        if keep_logits and self.holds_loss:
            logits_out.extend(self._gather_logits(info["logits"]) for info in store)
        return loss_sum, weight_sum

    @torch.no_grad()
    def _gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(s_cp, B, V/tp) on this rank -> (B, L, V) full, natural order."""
        ctx = self.ctx
        if ctx.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(ctx.tp)]
            dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
            logits = torch.cat(parts, dim=-1)
        return cpar.gather_zigzag(logits.transpose(0, 1), ctx.cp_group, dim=1)


def build_parallel_model(
    cfg: HyenaGLTConfig,
    layout: Layout,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> ParallelModel:
    """This rank's model for `layout` (after initialize_parallel), initialised to the same
    full weights as the single-device model of `cfg`, on `device` (default: this rank's GPU,
    or CPU): its pipeline stages, every block built with the parallel spec. The plain model
    and the token-merging U-shape (merging.py) are built and stepped the same way.
    """
    if layout.model != cfg:
        raise ValueError("the layout was validated for a different model config")
    ctx = RankContext.current(layout)
    mcfg = megatron_config(layout.parallel, cfg, dtype)
    device = device or parallel_device()
    family = family_of(cfg).causal_lm
    spec = parallel_spec(ctx, mcfg)
    stages = layout.stage_layers()
    last = layout.parallel.num_stages - 1
    vpp = layout.parallel.vpp
    chunks = []
    for v, s in enumerate(layout.chunk_stages(ctx.coords.pp)):
        stage = Stage(tuple(stages[s]), first=s == 0, last=s == last)
        lm = family(cfg, initialize=False, spec=spec, stage=stage)
        chunks.append(PipelineStage(lm, mcfg, ctx, vp_stage=v if vpp else None))
    for c in chunks:
        c.to(dtype=dtype)  # before filling, so fp64 weights are drawn at full precision
        if last > 0:
            # Parameters both end stages hold (the tied embedding; the U-shape's segment
            # encodings, used to merge and to unmerge): both copies' gradients are summed
            # (grads.py), and the grad norm counts the first stage's.
            for w in first_and_last_stage_params(c, cfg):
                w.shared_embedding = True
                if not c.is_first:
                    w.shared = True
    init_from_canonical(chunks, cfg, ctx)
    for c in chunks:
        c.to(device=device)
    return ParallelModel(chunks, ctx, dtype, device)


def first_and_last_stage_params(chunk: PipelineStage, cfg: HyenaGLTConfig) -> list[nn.Parameter]:
    """This chunk's copies of the parameters the first and the last pipeline stage both hold
    (by the one placement rule, sharding.held_by_stage)."""
    tied = cfg.tie_embeddings
    return [p for name, p in chunk.named_parameters()
            if held_by_stage(name, set(), first=True, last=False, tied=tied)
            and held_by_stage(name, set(), first=False, last=True, tied=tied)]
