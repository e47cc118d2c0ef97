"""The parallel spec: what hyena_glt's modules are built from on a rank of a layout.

hyena_glt builds one `Block`, operator, attention, MLP and embedding from a `ModelSpec`
(hyena_glt/spec.py). This is the megatron-core one:

* tensor parallel: megatron-core's column/row-parallel linears (sequence-parallel
  all-gather / reduce-scatter inside them when `sp`), the vocab-parallel embedding, output
  layer and cross entropy; filters, heads and MLP columns are split into `tp` contiguous
  parts by the modules themselves (spec.tp / spec.tp_rank);
* sequence parallel: the embedding output is scattered along the sequence; norms and the
  conservation gate are tagged so their gradients are summed over TP (grads.py);
* context parallel (zigzag): short convolutions exchange halos, D/H convolutions pass a
  halo and the modal state (or go through the all-to-all, `cp_long_conv`), attention
  gathers K/V (context_parallel.py).

Activations are sequence-first (L, B, D) in the blocks, megatron-core's convention, so its
SP mappings and pipeline p2p apply unchanged. The token-merging U-shape's patcher and bridge
work on whole batch-first sequences: `to_blocks` / `from_blocks` move between those and the
blocks' share (zigzag CP slice, then SP slice), gradients included (merging.py).
"""

from __future__ import annotations

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from hyena_glt.spec import LOCAL, ModelSpec

from . import context_parallel as cpar
from . import sequence_parallel as spar
from .groups import RankContext
from .tensor_parallel import ColumnLinear, OutputLayer, RowLinear, VocabEmbedding, vocab_parallel_cross_entropy


def parallel_spec(ctx: RankContext, mcfg: ModelParallelConfig) -> ModelSpec:
    """This rank's spec for its layout (TP, SP and CP as in `ctx`)."""
    cp_group = ctx.cp_group if ctx.cp > 1 else None
    cp, cp_rank, tp_sp = ctx.cp, ctx.coords.cp, ctx.tp if ctx.sp else 1

    def to_blocks(x):  # (B, L, D) whole, the same on every CP and TP rank
        y = cpar.zigzag_slice(x, cp, cp_rank, dim=1).transpose(0, 1)
        return spar.enter(y) if ctx.sp else y.contiguous()

    def from_blocks(y):  # this rank's (s, B, D) -> (B, L, D) whole
        if ctx.sp:
            y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        if cp_group is not None:
            y = cpar.whole_sequence(y, cp_group)
        return y.transpose(0, 1)

    spec = LOCAL.with_(
        name=f"megatron tp={ctx.tp}{' sp' if ctx.sp else ''} cp={ctx.cp}",
        column_linear=lambda d_in, d_out, std: ColumnLinear(d_in, d_out, mcfg),
        row_linear=lambda d_in, d_out, std, bias=False: RowLinear(d_in, d_out, mcfg, bias),
        embedding=lambda vocab, d_model, std: VocabEmbedding(vocab, d_model, mcfg),
        output_layer=lambda d_model, vocab: OutputLayer(d_model, vocab, mcfg, tied=True),
        cross_entropy=vocab_parallel_cross_entropy,
        tp=ctx.tp,
        tp_rank=ctx.coords.tp,
        seq_first=True,
        sequence_parallel=ctx.sp,
        split_context=lambda t: cpar.zigzag_slice(t, cp, cp_rank, dim=1),
        to_blocks=to_blocks,
        from_blocks=from_blocks,
        context_chunks=2 * cp if cp > 1 else 1,
        sequence_multiple=(2 * cp if cp > 1 else 1) * tp_sp,
        whole_loss_scale=1.0 / cp,
    )
    if ctx.sp:
        spec = spec.with_(enter_sequence_region=spar.enter)
    if cp_group is not None:
        # Module attributes are looked up at call time: a test can swap cpar.long_conv for a mutant.
        spec = spec.with_(
            short_conv=lambda u, h, skip=None: cpar.short_conv(u, h, cp_group, skip),
            long_conv=lambda z, filt: cpar.long_conv(z, filt, cp_group, ctx.pcfg.cp_long_conv),
            attention=lambda q, k, v, positions: cpar.attention(q, k, v, positions, cp_group),
        )
    return spec
