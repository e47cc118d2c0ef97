"""Context parallelism with zigzag load balancing, written on torch.distributed.

The sequence of length L is cut into 2*cp chunks; CP rank r holds chunks r and 2*cp-1-r
(in that order), so every rank gets the same share of causal-attention work.

* featurizer, `S` and motif (short) convolutions: each chunk needs the K-1 positions that
  precede it; they come from the neighbouring rank by point-to-point halo exchange (or
  from this rank's own first chunk, for the middle of the sequence), both chunks are then
  convolved as a batch of two.
* `D` and `H` (long) convolutions, two exact paths (`parallel.cp_long_conv`), picked by the
  CP path the filter's layer kind declares (`LayerKind.cp` in hyena_glt/kinds.py: `fir` for
  a finite filter, `modal` for a modal one), never by the filter's class:
  - `state` (default): `D` is finite (K taps), so it is one more halo exchange of K-1
    positions (when a chunk covers the halo; otherwise the all-to-all below). `H` runs its
    modal form on each chunk from a zero state, all-gathers every chunk's end state (one
    value per channel and pole), scans them in sequence order and adds what the states
    before each chunk contribute (hyena_glt/modal.py). Traffic: O(halo + state), not O(L).
  - `all2all`: from sequence-sharded (B, C, L/cp) to channel-sharded (B, C/cp, L), undo the
    zigzag, convolve the local channels over the whole sequence, and go back.
* attention: K and V are all-gathered over CP (backward: reduce-scatter); RoPE and the
  causal mask use the global zigzag positions.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from hyena_glt.fftconv import causal_conv
from hyena_glt.kinds import CP_FIR, CP_LONG_CONV_KINDS, CP_LONG_CONV_PATHS, CP_LONG_CONV_STATE, CP_MODAL, layer_kind
from hyena_glt.modal import modal_carry, modal_conv, state_scan


# Payload bytes this process handed to CP collectives, forward and backward, keyed
# "<operation>/<collective>" (e.g. "long_conv/halo"): what `bench cp` reports.
traffic: dict[str, int] = {}
_scope: list[str] = []


@contextlib.contextmanager
def _operation(name: str):
    """Attribute traffic to the outermost CP operation (a D halo inside long_conv is long_conv's)."""
    _scope.append(_scope[0] if _scope else name)
    try:
        yield
    finally:
        _scope.pop()


def _current_op() -> str:
    return _scope[-1] if _scope else "other"


def _count(collective: str, t: torch.Tensor, peers: float = 1, op: str | None = None) -> None:
    key = f"{op or _current_op()}/{collective}"
    traffic[key] = traffic.get(key, 0) + round(t.numel() * t.element_size() * peers)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the reduce-scatter that megatron's all-gather runs."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, peers: float):
        ctx.op, ctx.peers = _current_op(), peers
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _count("gather", grad, ctx.peers, ctx.op)
        return grad, None


# ---------------------------------------------------------------- zigzag bookkeeping
def zigzag_positions(seq_len: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by `cp_rank`, in local order (chunk r, then chunk 2cp-1-r)."""
    n = seq_len // (2 * cp)
    a = torch.arange(cp_rank * n, (cp_rank + 1) * n, device=device)
    b = torch.arange((2 * cp - 1 - cp_rank) * n, (2 * cp - cp_rank) * n, device=device)
    return torch.cat([a, b])


def zigzag_slice(t: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag share of a full-sequence tensor (sequence along `dim`)."""
    if cp == 1:
        return t
    idx = zigzag_positions(t.shape[dim], cp, cp_rank, device=t.device)
    return t.index_select(dim, idx)


def zigzag_order(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """Global positions of the CP-rank-ordered concatenation of all ranks' local sequences."""
    return torch.cat([zigzag_positions(seq_len, cp, r, device) for r in range(cp)])


@torch.no_grad()
def gather_zigzag(local: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Inverse of zigzag_slice (no autograd): the full sequence, in natural order, on every CP rank."""
    cp = group.size()
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    cat = torch.cat(parts, dim=dim)
    seq_len = cat.shape[dim]
    inverse = torch.argsort(zigzag_order(seq_len, cp, device=local.device))
    return cat.index_select(dim, inverse)


# ---------------------------------------------------------------- all-to-all (long convolutions)
class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 (part j goes to rank j). Its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.op = group, _current_op()
        x = x.contiguous()
        _count("all2all", x, (group.size() - 1) / group.size())
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        _count("all2all", grad, (ctx.group.size() - 1) / ctx.group.size(), ctx.op)
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_channel(z: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, C, L/cp) zigzag-local -> (B, C/cp, L) with channels [r*C/cp, (r+1)*C/cp), natural order."""
    cp = group.size()
    B, C, Lc = z.shape
    n = Lc // 2
    x = z.reshape(B, cp, C // cp, Lc).transpose(0, 1)  # (cp, B, C/cp, Lc): part j -> rank j
    y = _AllToAll.apply(x, group)  # y[j]: rank j's two chunks of my channels
    y = y.view(cp, B, C // cp, 2, n)
    first = y[:, :, :, 0].permute(1, 2, 0, 3).reshape(B, C // cp, cp * n)  # chunks 0..cp-1
    second = y[:, :, :, 1].flip(0).permute(1, 2, 0, 3).reshape(B, C // cp, cp * n)  # chunks cp..2cp-1
    return torch.cat([first, second], dim=-1)


def channel_to_seq(y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of seq_to_channel: (B, C/cp, L) natural order -> (B, C, L/cp) zigzag-local."""
    cp = group.size()
    B, Cl, L = y.shape
    n = L // (2 * cp)
    first = y[..., : L // 2].reshape(B, Cl, cp, n)
    second = y[..., L // 2 :].reshape(B, Cl, cp, n).flip(2)
    x = torch.stack([first, second], dim=3)  # (B, Cl, cp, 2, n): [.., j, :, :] is rank j's pair
    x = x.permute(2, 0, 1, 3, 4)  # (cp, B, Cl, 2, n)
    out = _AllToAll.apply(x, group)  # out[j]: channel part j of my sequence
    return out.permute(1, 0, 2, 3, 4).reshape(B, cp * Cl, 2 * n)


def long_conv(z: torch.Tensor, filt: torch.nn.Module, group: dist.ProcessGroup,
              path: str = CP_LONG_CONV_STATE) -> torch.Tensor:
    """The long causal convolution (with skip) of zigzag-local z (B, C, 2n) over the full
    context, by filter `filt` of a block of kind `filt.code`."""
    if path not in CP_LONG_CONV_PATHS:
        raise ValueError(f"cp_long_conv={path!r}: expected one of {CP_LONG_CONV_PATHS}")
    kind = layer_kind(filt.code)
    if kind.cp not in CP_LONG_CONV_KINDS:
        raise ValueError(f"layer kind {kind.code!r} ({kind.origin}) declares the context-parallel path {kind.cp!r}, "
                         f"which has no long convolution: declare one of {CP_LONG_CONV_KINDS} or use spec.short_conv")
    with _operation("long_conv"):
        return _long_conv(z, filt, kind.cp, group, path)


def _long_conv(z: torch.Tensor, filt: torch.nn.Module, cp_path: str, group: dist.ProcessGroup, path: str) -> torch.Tensor:
    n = z.shape[-1] // 2
    if path == CP_LONG_CONV_STATE and cp_path == CP_MODAL:
        return modal_state_conv(z, filt, group)
    if path == CP_LONG_CONV_STATE and cp_path == CP_FIR and filt.weight.shape[-1] - 1 <= n:
        return short_conv(z, filt.filter(), group, filt.skip)
    cp, r = group.size(), group.rank()
    zc = seq_to_channel(z, group)
    c_local = zc.shape[1]
    return channel_to_seq(filt.conv(zc, channels=slice(r * c_local, (r + 1) * c_local)), group)


def modal_state_conv(z: torch.Tensor, filt: torch.nn.Module, group: dist.ProcessGroup) -> torch.Tensor:
    """A modal filter (`residues`, `log_rates`, `skip`; the `H` kind) over CP by its modal state: chunk i's outputs are its own convolution from a zero
    state plus what the state after chunk i-1 adds; that state is the scan
    S_i = exp(-rate n) S_{i-1} + s_i over every chunk's own end state s_i."""
    cp, r = group.size(), group.rank()
    B, C, L2 = z.shape
    n = L2 // 2
    pair = torch.stack([z[..., :n], z[..., n:]])  # my chunks r and 2cp-1-r as a batch
    y, ends = modal_conv(pair.reshape(2 * B, C, n), filt.residues, filt.log_rates)
    ends = ends.reshape(2, B, C, -1)
    gathered = all_gather_cp(ends, group).reshape(cp, 2, B, C, -1)  # backward: reduce-scatter
    # Chunk order: rank q holds chunks q and 2cp-1-q.
    chunks = torch.cat([gathered[:, 0], gathered[:, 1].flip(0)])  # (2cp, B, C, O)
    decay = torch.exp(-filt.log_rates.to(chunks.dtype).exp() * n)
    S = state_scan(chunks.permute(1, 2, 0, 3), decay)  # (B, C, 2cp, O): state after each chunk
    zero = S.new_zeros(B, C, S.shape[-1])
    before = torch.stack([S[:, :, r - 1] if r > 0 else zero, S[:, :, 2 * cp - 2 - r]])  # (2, B, C, O)
    carry = modal_carry(before.reshape(2 * B, C, -1), filt.residues, filt.log_rates, n)
    y = (y.to(carry.dtype) + carry).to(z.dtype).reshape(2, B, C, n)
    return torch.cat([y[0], y[1]], dim=-1) + filt.skip.to(z.dtype)[:, None] * z


# ---------------------------------------------------------------- halo exchange (short convolutions)
def _exchange(send_prev, send_next, recv_prev, recv_next, group, op=None):
    """Send to / receive from the CP neighbours (None = nothing). Global ranks from the group."""
    ranks = dist.get_process_group_ranks(group)
    r = group.rank()
    for t in (send_prev, send_next):
        if t is not None:
            _count("halo", t, op=op)
    ops = []
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), ranks[r - 1], group))
    if recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, recv_prev, ranks[r - 1], group))
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), ranks[r + 1], group))
    if recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, recv_next, ranks[r + 1], group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Halo(torch.autograd.Function):
    """Halos (the `k` positions before each local chunk) for zigzag-local x (B, C, 2n).

    Chunk r's halo is the tail of chunk r-1 = rank r-1's first chunk (zeros on rank 0).
    Chunk 2cp-1-r's halo is the tail of chunk 2cp-2-r = rank r+1's second chunk, or on the
    last rank this rank's own first chunk. Backward sends halo gradients back to their owners.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, group: dist.ProcessGroup):
        cp, r = group.size(), group.rank()
        n = x.shape[-1] // 2
        a_tail, b_tail = x[..., n - k : n], x[..., 2 * n - k :]
        cf = torch.contiguous_format  # p2p buffers must be contiguous
        halo_a = torch.zeros_like(a_tail, memory_format=cf)
        halo_b = a_tail.clone(memory_format=cf) if r == cp - 1 else torch.empty_like(b_tail, memory_format=cf)
        _exchange(
            send_prev=b_tail if r > 0 else None,
            send_next=a_tail if r < cp - 1 else None,
            recv_prev=halo_a if r > 0 else None,
            recv_next=halo_b if r < cp - 1 else None,
            group=group,
        )
        ctx.k, ctx.group, ctx.shape, ctx.op = k, group, x.shape, _current_op()
        return halo_a, halo_b

    @staticmethod
    def backward(ctx, g_halo_a: torch.Tensor, g_halo_b: torch.Tensor):
        cp, r, k = ctx.group.size(), ctx.group.rank(), ctx.k
        n = ctx.shape[-1] // 2
        grad = g_halo_a.new_zeros(ctx.shape)
        cf = torch.contiguous_format
        g_a_tail = torch.zeros_like(g_halo_a, memory_format=cf)
        g_b_tail = torch.zeros_like(g_halo_b, memory_format=cf)
        _exchange(
            send_prev=g_halo_a if r > 0 else None,
            send_next=g_halo_b if r < cp - 1 else None,
            recv_prev=g_b_tail if r > 0 else None,
            recv_next=g_a_tail if r < cp - 1 else None,
            group=ctx.group,
            op=ctx.op,
        )
        if r == cp - 1:
            g_a_tail = g_a_tail + g_halo_b
        grad[..., n - k : n] += g_a_tail
        grad[..., 2 * n - k :] += g_b_tail
        return grad, None, None


def short_conv(x: torch.Tensor, h: torch.Tensor, group: dist.ProcessGroup, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv of zigzag-local x (B, C, 2n) with a short filter h (C, K) (+ skip * x)."""
    with _operation("short_conv"):
        return _short_conv(x, h, group, skip)


def _short_conv(x: torch.Tensor, h: torch.Tensor, group: dist.ProcessGroup, skip: torch.Tensor | None) -> torch.Tensor:
    k = h.shape[-1] - 1
    conv = lambda u: causal_conv(u, h, skip)  # noqa: E731
    if k == 0:
        return conv(x)
    B, C, L2 = x.shape
    n = L2 // 2
    halo_a, halo_b = _Halo.apply(x, k, group)
    ext = torch.stack(
        [torch.cat([halo_a, x[..., :n]], -1), torch.cat([halo_b, x[..., n:]], -1)]
    )  # (2, B, C, k + n): both chunks as one batch
    y = conv(ext.reshape(2 * B, C, k + n))[..., k:]
    return y.reshape(2, B, C, n).permute(1, 2, 0, 3).reshape(B, C, 2 * n)


# ---------------------------------------------------------------- whole sequences (token merging)
def whole_sequence(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's zigzag share (s, ...) -> the whole sequence (cp*s, ...) in natural order
    on every rank. Backward: every rank's whole-sequence work puts a part of the gradient on
    every position; they are summed over CP and each rank keeps its share (reduce-scatter).
    Its inverse is `zigzag_slice`, whose backward leaves zeros outside this rank's share, so
    CP-replicated parameters before it get this rank's part of their gradient, as all
    CP-replicated parameters do (grads.py sums them over DP x CP)."""
    with _operation("merging"):
        t = all_gather_cp(t, group)
    return t.index_select(0, torch.argsort(zigzag_order(t.shape[0], group.size(), device=t.device)))


# ---------------------------------------------------------------- attention
def all_gather_cp(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather along dim 0 over CP in CP-rank order; the backward reduce-scatters, summing
    the gradient every rank's use (queries on keys/values, chunks on states) put on it."""
    cp = group.size()
    _count("gather", t, cp - 1)
    gathered = gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True, group=group)
    return _CountBackward.apply(gathered, (cp - 1) / cp)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              group: dist.ProcessGroup) -> torch.Tensor:
    """Causal attention of this rank's zigzag queries (B, h, s, hd) over every rank's keys.

    Every query needs every earlier key: K and V (already rotated at their own global
    positions) are gathered from all CP ranks, and the mask compares the queries' and keys'
    indices in the whole sequence, not local indices. (`positions` only went into RoPE:
    they are not indices when the sequence is one of patches, each at its first byte's position.)"""
    with _operation("attention"):
        kv = all_gather_cp(torch.stack([k, v]).permute(3, 0, 1, 2, 4).contiguous(), group)  # (L, 2, B, h, hd)
    k, v = kv.permute(1, 2, 3, 0, 4)  # (B, h, L, hd) each, CP-rank order
    L, cp = kv.shape[0], group.size()
    key_index = zigzag_order(L, cp, device=q.device)
    query_index = zigzag_positions(L, cp, dist.get_rank(group), device=q.device)
    mask = key_index <= query_index[:, None]  # (s, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
