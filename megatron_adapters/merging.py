"""Tensor parallelism for the token-merging U-shape (hyena_glt.blt.BLTForCausalLM).

The U-shape is built by its own constructor with a tensor-parallel block factory, so every
residual block (local encoder, global model over patches, local decoder, the entropy
patcher's byte LM) is the same ParallelBlock the plain model uses, split by channel group,
head and MLP column over TP. The byte embedding and the output layer are vocab-parallel and
the loss is megatron's vocab-parallel cross entropy, as in the plain model.

What stays replicated on every TP rank: the patcher heads (learned merger, entropy model's
embedding), the position system and the byte<->patch bridge. They are small (a few d_model^2
matrices against the blocks' 10+ per layer), their inputs are the full activations every TP
rank holds between blocks, and the gradients reaching them are the same on every TP rank
(a column-parallel layer all-reduces its input gradient), so they need no communication
and no gradient all-reduce: the same reason megatron-core replicates its norms.

Parameter names stay canonical (the single-device names), so checkpoints, `convert` and
`gather_full_state_dict` work unchanged, and every parameter is drawn from the single-device
init rule and sliced, so TP=2 starts from the weights of one process.
"""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig

from hyena_glt.blt import BLTForCausalLM
from hyena_glt.config import HyenaGLTConfig
from hyena_glt.loss import default_loss_weights

from .groups import RankContext
from .parallel_model import ParallelBlock
from .tensor_parallel import OutputLayer, vocab_embedding, vocab_parallel_cross_entropy


class BatchFirstParallelBlock(ParallelBlock):
    """A ParallelBlock with the single-device Block's calling convention: (B, L, D) in and
    out, position_ids (L,), (B, L) (the global model's per-sample patch positions) or None."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,  # type: ignore[override]
                conservation: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        c = conservation.t() if conservation is not None else None
        return super().forward(x.transpose(0, 1), positions, c).transpose(0, 1)


class TensorParallelBLTForCausalLM(BLTForCausalLM):
    """This TP rank's share of BLTForCausalLM; logits are vocab-sharded (B, L, V/tp)."""

    def __init__(self, cfg: HyenaGLTConfig, ctx: RankContext, mcfg: ModelParallelConfig):
        def block(code: str, block_cfg: HyenaGLTConfig, index: int) -> BatchFirstParallelBlock:
            return BatchFirstParallelBlock(code, block_cfg, ctx, mcfg)

        super().__init__(cfg, initialize=False, block=block)
        self.model.embed = vocab_embedding(cfg, mcfg)
        if cfg.tie_embeddings:
            self.output_layer = OutputLayer(cfg.d_model, cfg.vocab_size, mcfg, tied=True)
        else:
            self.lm_head = OutputLayer(cfg.d_model, cfg.vocab_size, mcfg, tied=False)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings:
            return self.output_layer(hidden, weight=self.model.embed.weight)
        return self.lm_head(hidden)

    def lm_loss(self, logits, labels, loss_weights) -> tuple[torch.Tensor, torch.Tensor]:
        if loss_weights is None:
            loss_weights = default_loss_weights(labels)
        ce = vocab_parallel_cross_entropy(logits, labels.clamp_min(0))  # (B, L), the same on every TP rank
        w = loss_weights.to(ce.dtype)
        return (ce * w).sum(), w.sum()


def build_merging_model(cfg: HyenaGLTConfig, layout, dtype: torch.dtype, device: torch.device):
    """This rank's token-merging model for a (data x tensor parallel) layout, wrapped for the
    trainer's step: the single-device U-shape when tp == 1, else its TP shard, initialised
    to the same full weights either way."""
    from hyena_glt.model import build_causal_lm

    from .build import _init_canonical
    from .replicated import ReplicatedModel
    from .tensor_parallel import megatron_config

    ctx = RankContext.current(layout)
    if ctx.tp == 1:
        model = build_causal_lm(cfg).to(dtype=dtype)
    else:
        model = TensorParallelBLTForCausalLM(cfg, ctx, megatron_config(layout.parallel, cfg, dtype)).to(dtype=dtype)
        _init_canonical([model], cfg, ctx)
    return ReplicatedModel(model, ctx, device)
