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

Activations are sequence-first (L, B, D) in the pipeline chunks, megatron-core's
convention, so its SP mappings and pipeline p2p apply unchanged; the token-merging U-shape
runs batch-first with tensor parallelism only (`seq_first=False`).
"""

from __future__ import annotations

from megatron.core import ModelParallelConfig

from hyena_glt.spec import LOCAL, ModelSpec

from . import context_parallel as cpar
from . import sequence_parallel as spar
from .groups import RankContext
from .tensor_parallel import ColumnLinear, OutputLayer, RowLinear, VocabEmbedding, vocab_parallel_cross_entropy


def parallel_spec(ctx: RankContext, mcfg: ModelParallelConfig, *, seq_first: bool = True) -> ModelSpec:
    """This rank's spec for its layout (TP, SP and CP as in `ctx`)."""
    cp_group = ctx.cp_group if ctx.cp > 1 else None
    if not seq_first and (ctx.sp or cp_group is not None):
        raise ValueError("sequence and context parallelism need sequence-first activations")
    spec = LOCAL.with_(
        name=f"megatron tp={ctx.tp}{' sp' if ctx.sp else ''} cp={ctx.cp}",
        column_linear=lambda d_in, d_out, std: ColumnLinear(d_in, d_out, mcfg),
        row_linear=lambda d_in, d_out, std, bias=False: RowLinear(d_in, d_out, mcfg, bias),
        embedding=lambda vocab, d_model, std: VocabEmbedding(vocab, d_model, mcfg),
        output_layer=lambda d_model, vocab: OutputLayer(d_model, vocab, mcfg, tied=True),
        cross_entropy=vocab_parallel_cross_entropy,
        tp=ctx.tp,
        tp_rank=ctx.coords.tp,
        seq_first=seq_first,
        sequence_parallel=ctx.sp,
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
