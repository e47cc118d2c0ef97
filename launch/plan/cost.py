"""The step-time model of a training layout: compute, communication, pipeline bubble.

For the slowest pipeline rank of a layout (docs/planning.md has the formulas):

* compute: each block's forward FLOPs per token (`LayerKind.flops` of its kind plus the gated
  MLP), on 1/tp of the block, at the profile's achieved rate of the kind (`kind_achieved`,
  a measured whole block) or of each FLOP term (`achieved`) plus the memory-bound work: the
  values the block keeps, streamed through device memory 4 times; backward twice the
  forward, activation checkpointing one forward more; the output layer on the last stage;
  the optimizer step streams its states through device memory.
* communication: the bytes each collective moves, over the link it crosses (a group whose
  ranks lie on one node uses `intra_node`, else `inter_node`; ranks are ordered tp, cp, dp,
  pp as megatron-core does), as ring collectives (all-reduce: 2(n-1)/n of the bytes and
  2(n-1) latencies; all-gather and reduce-scatter half of that) at the link's rate for the
  collective (`Link.op`):
  - TP: what megatron-core's parallel linears run, for the linears a block really builds
    (`tp_linears`): a column-parallel one all-reduces its input's gradient in backward, a
    row-parallel one its output in forward; under SP the first all-gathers its input forward
    and again backward (it keeps only its share) and reduce-scatters the gradient, the second
    reduce-scatters its output and all-gathers the gradient. The embedding all-reduces its
    output, the output layer is a column-parallel linear and vocab-parallel cross entropy
    all-reduces 3 values per token;
  - CP: what each kind declares (`LayerKind.cp_sends`): halos, the long convolution's modal
    state or all-to-all, the K/V gather, forward and backward, with the same accounting as
    the counters of megatron_adapters/context_parallel.py (`cp_bytes` equals them: tests/plan);
  - DP: the gradient sum over dp x cp (ZeRO-1/2: reduce + all-gather of the parameters; ZeRO-3
    also gathers the parameters for forward and backward);
  - PP: each micro-batch's activations forward and gradients backward between stages.
* the pipeline bubble: (pp - 1) / vpp micro-batch times more than the m micro-batches take
  (on a CPU whose ranks time-share cores, at the speed of the fewer ranks busy then).

No overlap of communication with compute is assumed: the trainer reduces gradients after the
backward and the pipeline's sends block (megatron_adapters), so the model adds them up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hyena_glt.kinds import (
    CP_LONG_CONV_ALL2ALL,
    CP_SEND_HALO,
    CP_SEND_KV,
    CP_SEND_LONG_CONV,
    FLOP_TERMS,
    layer_kind,
    mixer_flops,
)

from .hardware import Hardware
from .memory import FP32, RankEstimate, estimate, layer_values

CROSS_ENTROPY_REDUCTIONS = 3  # vocab-parallel cross entropy: the logits' max, the sum of exps, the target logit


# ---------------------------------------------------------------------------- model FLOPs
def forward_flops_per_token(cfg, L: int) -> dict:
    """Model FLOPs of one forward, per token, of a plain striped model (docs/performance.md):
    matmuls (projections, gated MLP, output layer), causal attention, convolutions. Each
    block's mixer counts what its layer kind declares (`LayerKind.flops`, hyena_glt/kinds.py);
    the gated MLP and the output layer are the model's."""
    D, V = cfg.d_model, cfg.vocab_size
    total = dict.fromkeys(FLOP_TERMS, 0.0)
    total["matmul"] = 2.0 * D * V  # output layer (tied or not, one D x V product)
    for code, n in Counter(cfg.layers).items():
        for term, flops in block_flops(code, cfg, L).items():
            total[term] += n * flops
    return {**total, "total": sum(total.values())}


_MEMO: dict = {}


def _memo(fn):
    """Memoize `fn(code, cfg, *rest)` per config object: a plan asks the same few blocks of one
    config thousands of times (the config is kept in the entry, so its id is not reused)."""
    def cached(code, cfg, *rest):
        key = (fn.__name__, code, id(cfg), *rest)
        hit = _MEMO.get(key)
        if hit is None or hit[0] is not cfg:
            if len(_MEMO) > 100_000:
                _MEMO.clear()
            hit = _MEMO[key] = (cfg, fn(code, cfg, *rest))
        return hit[1]

    cached.__doc__ = fn.__doc__
    return cached


@_memo
def block_flops(code: str, cfg, L: int) -> dict[str, float]:
    """Forward FLOPs per token of one block: its mixer (by its kind) and the gated MLP."""
    terms = mixer_flops(code, cfg, L)
    terms["matmul"] += 3 * 2.0 * cfg.d_model * cfg.mlp_hidden  # gated MLP: gate, up, down
    return terms


@_memo
def tp_linears(code: str, cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input widths of one block's column-parallel linears, output widths of its row-parallel
    ones): the block is built on the meta device from a spec that records what it asks for,
    so a kind's mixer (and a plug-in's) is counted as it is built, the gated MLP too."""
    import dataclasses

    import torch

    from hyena_glt.layers import Block
    from hyena_glt.spec import LOCAL

    columns, rows = [], []

    def column(d_in, d_out, *args, **kwargs):
        columns.append(d_in)
        return LOCAL.column_linear(d_in, d_out, *args, **kwargs)

    def row(d_in, d_out, *args, **kwargs):
        rows.append(d_out)
        return LOCAL.row_linear(d_in, d_out, *args, **kwargs)

    with torch.device("meta"):
        Block(code, cfg, 1, dataclasses.replace(LOCAL, column_linear=column, row_linear=row))
    return tuple(columns), tuple(rows)


def tp_collectives(codes: Counter, cfg, tokens: int, value_bytes: int, sp: bool, recompute: bool, first: bool,
                   last: bool) -> Counter:
    """(collective, bytes of the whole tensor) -> calls, of one micro-batch's forward and
    backward on a tensor-parallel rank holding the blocks `codes` (and the embedding / output
    layer on the first / last stage); tests/plan counts them in a real run."""
    calls: Counter = Counter()

    def column(w: int, n: int) -> None:
        nbytes = tokens * w * value_bytes
        if sp:
            calls["all_gather", nbytes] += n * passes + n  # forward (again when recomputed), backward
            calls["reduce_scatter", nbytes] += n
        else:
            calls["all_reduce", nbytes] += n

    def row(w: int, n: int, forwards: int) -> None:
        nbytes = tokens * w * value_bytes
        if sp:
            calls["reduce_scatter", nbytes] += n * forwards
            calls["all_gather", nbytes] += n
        else:
            calls["all_reduce", nbytes] += n * forwards

    # A checkpointed block runs its forward again before the backward, up to the last tensor
    # the backward needs (torch.utils.checkpoint stops there): all but the block's output,
    # its last row-parallel linear's reduction.
    passes = 2 if recompute else 1
    for code, n in codes.items():
        cols, rows = tp_linears(code, cfg)
        for w in cols:
            column(w, n)
        for i, w in enumerate(rows):
            row(w, n, 1 if i == len(rows) - 1 else passes)
    d = cfg.d_model
    if first:  # vocab-parallel embedding: partial rows summed (then split over the sequence under SP)
        calls["all_reduce", tokens * d * value_bytes] += 1
        if sp:
            calls["all_gather", tokens * d * value_bytes] += 1
    if last:
        passes = 1
        column(d, 1)
        calls["all_reduce", tokens * FP32] += CROSS_ENTROPY_REDUCTIONS
    return calls


def tp_seconds(codes: Counter, cfg, tokens: int, value_bytes: int, tp: int, sp: bool, recompute: bool, link,
               first: bool, last: bool) -> float:
    """Seconds one micro-batch's tensor-parallel collectives (`tp_collectives`) take."""
    if tp == 1:
        return 0.0
    calls = tp_collectives(codes, cfg, tokens, value_bytes, sp, recompute, first, last)
    return sum(n * _ring(op, nbytes, tp, link) for (op, nbytes), n in calls.items())


@_memo
def _sends(code: str, cfg) -> tuple:
    sends = layer_kind(code).cp_sends
    return tuple(sends(cfg)) if sends else ()


def train_flops_per_token(cfg, L: int) -> float:
    """Forward + backward (twice the forward): the 6N-per-token convention with the attention
    and convolution terms. Activation recomputation is not model work and is not counted."""
    return 3.0 * forward_flops_per_token(cfg, L)["total"]


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, gpus: int = 1) -> float:
    return tokens_per_s * flops_per_token / (gpus * peak_tflops * 1e12)


def block_seconds_per_token(code: str, cfg, L: int, hw: Hardware, tp: int) -> float:
    """Forward seconds per token of one block's 1/tp share on one device."""
    terms = block_flops(code, cfg, L)
    if code in hw.kind_achieved:
        return sum(terms.values()) / tp / (hw.peak_tflops * 1e12 * hw.kind_achieved[code])
    return sum(f / hw.rate(t) for t, f in terms.items() if f) / tp


# values a block keeps per token are written in the forward, read in the backward, and their
# gradients written and read once: the memory-bound (elementwise) work beside the FLOPs
ELEMENTWISE_ACCESSES = 4


def block_elementwise_seconds_per_token(code: str, cfg, L: int, hw: Hardware, tp: int, sp: bool, cp: int,
                                        value_bytes: int, recompute: bool) -> float:
    """Seconds per token one block's memory-bound work takes on one device: its kept values
    (memory.layer_values) streamed ELEMENTWISE_ACCESSES times (+1 when recomputed) through
    device memory. 0 for a kind whose whole block was measured (kind_achieved includes it)."""
    if code in hw.kind_achieved:
        return 0.0
    values = layer_values(code, cfg, L, tp, sp, cp)[0]
    return values * value_bytes * (ELEMENTWISE_ACCESSES + recompute) / (hw.memory_bandwidth_gbs * 1e9)


# ---------------------------------------------------------------------------- CP traffic
def cp_bytes(cfg, L: int, micro_batch: int, cp: int, tp: int, cp_rank: int, value_bytes: int,
             path: str, recompute: bool = False, codes=None) -> dict[str, int]:
    """Bytes CP rank `cp_rank` hands to context-parallel collectives in one micro-batch's
    forward and backward, keyed as megatron_adapters.context_parallel.traffic counts them
    ("<operation>/<collective>"). `value_bytes`: activations' element size (2 in bf16); a modal
    state is always fp32. `codes`: the blocks counted (default: every block of the model)."""
    if cp == 1:
        return {}
    out: dict[str, int] = {}
    n = L // (2 * cp)  # a zigzag chunk
    b, passes = micro_batch, 2 + (1 if recompute else 0)  # forward (again under recompute) + backward
    neighbours = (cp_rank > 0) + (cp_rank < cp - 1)

    def add(key: str, nbytes: float) -> None:
        out[key] = out.get(key, 0) + count * round(nbytes)

    for code, count in Counter(cfg.layers if codes is None else codes).items():
        for x in _sends(code, cfg):
            c = x.channels // tp
            if x.op == CP_SEND_KV:
                add("attention/gather", passes * b * (L // cp) * c * value_bytes * (cp - 1))
            elif x.op == CP_SEND_HALO:
                if x.taps:
                    add("short_conv/halo", passes * neighbours * b * c * x.taps * value_bytes)
            elif x.op == CP_SEND_LONG_CONV:
                if path != CP_LONG_CONV_ALL2ALL and x.state:
                    add("long_conv/gather", passes * 2 * b * c * x.state * FP32 * (cp - 1))
                elif path != CP_LONG_CONV_ALL2ALL and x.taps and x.taps - 1 <= n:
                    add("long_conv/halo", passes * neighbours * b * c * (x.taps - 1) * value_bytes)
                else:  # sequence -> channel and back, forward and backward
                    add("long_conv/all2all", passes * 2 * b * c * 2 * n * value_bytes * (cp - 1) / cp)
    return out


def undeclared_cp_kinds(cfg) -> list[str]:
    return sorted({c for c in cfg.layers if layer_kind(c).cp_sends is None})


# ---------------------------------------------------------------------------- the prediction
@dataclass
class Prediction:
    ranks: list[RankEstimate]
    compute_s: float  # the slowest pipeline rank's compute per step (its micro-batches, no bubble)
    elementwise_s: float  # of compute_s, the memory-bound part (ELEMENTWISE_ACCESSES)
    bubble_s: float
    comm_s: dict[str, float]  # tp / cp / dp / pp seconds per step on the slowest rank
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    peak_bytes: int  # the largest rank's memory (with the profile's runtime_gib)
    budget_bytes: float
    links: dict[str, str] = field(default_factory=dict)  # group -> "intra" / "inter"

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def bound(self) -> str:
        """The largest term of the step time."""
        terms = {"compute": self.compute_s, "bubble": self.bubble_s, "optimizer": self.optimizer_s,
                 **{f"{k} comm": v for k, v in self.comm_s.items()}}
        return max(terms, key=terms.get)


def _ring(kind: str, nbytes: float, n: int, link) -> float:
    """A ring collective over n ranks of `nbytes` (the whole tensor) at the link's rate for it."""
    if n == 1:
        return 0.0
    rate = link.op(kind)
    if kind == "all_reduce":
        return rate.seconds(2 * (n - 1) / n * nbytes, 2 * (n - 1))
    return rate.seconds((n - 1) / n * nbytes, n - 1)  # all_gather, reduce_scatter


def ranks_per_node(world: int, hw: Hardware, per_node: int | None) -> int:
    return min(world, per_node or hw.devices_per_node)


def predict(tc, layout, hw: Hardware, per_node: int | None = None) -> Prediction:
    """The step time, throughput and memory of TrainConfig `tc` on `layout` (validated) and
    hardware `hw`, with `per_node` ranks per node (default: the profile's devices per node)."""
    cfg, p, t = tc.model, layout.parallel, tc.train
    world, dp = layout.world_size, layout.dp
    tp, cp, pp, vpp = p.tp, p.cp, p.pp, p.vpp or 1
    node = ranks_per_node(world, hw, per_node)
    # CPU: ranks beyond the cores time-share them, in compute and in communication (a collective
    # ends only when every member has had its turn on a core)
    share = max(1.0, node / hw.devices_per_node)
    L, b = t.seq_len, t.micro_batch_size
    m = tc.micro_batches_per_rank(dp)
    value = FP32 if t.precision == "fp32" else 2
    tokens = b * (L // cp)  # per rank and micro-batch
    stages = layout.stage_layers()
    last = p.num_stages - 1

    # the groups' links (rank order tp, cp, dp, pp)
    def crosses(stride: int, size: int) -> bool:
        return size > 1 and stride * size > node

    links = {"tp": crosses(1, tp), "cp": crosses(tp, cp), "dp": crosses(tp * cp, dp * cp if cp > 1 else dp),
             "pp": crosses(tp * cp * dp, pp)}
    link = {k: hw.link(v) for k, v in links.items()}

    ranks = estimate(tc, layout)
    slowest = None
    for r in range(pp):
        mine = layout.chunk_stages(r)
        codes = Counter(cfg.layers[i] for st in mine for i in stages[st])
        fwd = sum(n * block_seconds_per_token(c, cfg, L, hw, tp) for c, n in codes.items()) * tokens
        compute = fwd * (4 if t.activation_checkpointing else 3)
        if last in mine:
            compute += 3 * 2.0 * cfg.d_model * cfg.vocab_size / tp / hw.rate("matmul") * tokens
        elementwise = sum(n * block_elementwise_seconds_per_token(c, cfg, L, hw, tp, p.sp, cp, value,
                                                                  t.activation_checkpointing)
                          for c, n in codes.items()) * tokens
        compute = (compute + elementwise) * share
        elementwise *= share
        tp_s = share * tp_seconds(codes, cfg, tokens, value, tp, p.sp, t.activation_checkpointing, link["tp"],
                                  0 in mine, last in mine)
        cp_s = 0.0
        if cp > 1:  # an interior CP rank (two neighbours); one message per exchange, pass and peer
            sent = cp_bytes(cfg, L, b, cp, tp, min(1, cp - 1), value, p.cp_long_conv, t.activation_checkpointing,
                            codes=codes.elements())
            exchanges = sum(n * len(_sends(c, cfg)) for c, n in codes.items())
            cp_s = share * link["cp"].seconds(sum(sent.values()),
                                              exchanges * (3 if t.activation_checkpointing else 2) * (cp - 1))
        mb_s = compute + tp_s + cp_s  # one micro-batch
        if slowest is None or mb_s > slowest[0]:
            slowest = (mb_s, r, compute, tp_s, cp_s, elementwise)
    mb_s, r, compute, tp_s, cp_s, elementwise = slowest
    est = ranks[r]
    # PP: activations forward and their gradients backward, per micro-batch and model chunk
    pp_bytes = tokens * cfg.d_model * value / (tp if p.sp else 1)
    pp_s = share * 2 * m * vpp * link["pp"].seconds(pp_bytes) if pp > 1 else 0.0
    # DP x CP: the gradient sum (and ZeRO's parameter gathers)
    grad_bytes = est.params * FP32
    n = dp * cp
    zero = tc.zero.stage
    if zero == 0:
        dp_s = _ring("all_reduce", grad_bytes, n, link["dp"])
    elif zero == 1:
        dp_s = _ring("all_reduce", grad_bytes, n, link["dp"]) + _ring("all_gather", grad_bytes, n, link["dp"])
    elif zero == 2:
        dp_s = _ring("reduce_scatter", grad_bytes, n, link["dp"]) + _ring("all_gather", grad_bytes, n, link["dp"])
    else:
        dp_s = _ring("reduce_scatter", grad_bytes, n, link["dp"]) + 3 * _ring("all_gather", grad_bytes, n, link["dp"])
    dp_s *= share
    # AdamW streams p, g, m, v in and p, m, v out (+ the gradient norm's read): 32 bytes per value
    part = est.params / (n if zero else 1)
    optimizer_s = 32 * part / (hw.memory_bandwidth_gbs * 1e9) * share
    compute_total = m * compute
    # in the bubble only one stage's ranks work: where ranks time-share cores they then have
    # more of them (share / pp ranks per core, at least one)
    bubble_s = (pp - 1) / vpp * mb_s * max(1.0, share / pp) / share if pp > 1 else 0.0
    comm = {"tp": m * tp_s, "cp": m * cp_s, "dp": dp_s, "pp": pp_s}
    step = m * mb_s + bubble_s + dp_s + pp_s + optimizer_s
    tps = t.global_batch_size * L / step
    budget = hw.usable_bytes * (hw.devices_per_node / node if node > hw.devices_per_node else 1)
    return Prediction(ranks=ranks, compute_s=compute_total, elementwise_s=m * elementwise, bubble_s=bubble_s, comm_s=comm, optimizer_s=optimizer_s,
                      step_s=step, tokens_per_s=tps,
                      mfu=mfu(tps, train_flops_per_token(cfg, L), hw.peak_tflops, world),
                      peak_bytes=max(e.total for e in ranks) + round(hw.runtime_gib * 2**30), budget_bytes=budget,
                      links={k: "inter" if v else "intra" for k, v in links.items()})
