"""Patch bookkeeping shared by every patcher and the position system, fully vectorized.

A patch boundary b[i] = True means byte i starts a new patch (byte 0 always does). From the
boundaries follow each byte's patch id (cumsum - 1, clamped to the fixed number of slots P),
each patch's start byte and length, and each byte's position inside its patch.

Causality: every quantity at byte i depends on b[0..i] only, except a patch's *length*,
which is known once the next patch has started (its consumers, bytes of later patches, always
come after that point).

Static shapes: the number of slots P is fixed per sequence length. Slots after the last real
patch are padding (length 0, masked); if a sequence has more patches than slots, the extra
bytes are folded into the last slot (counted in `overflow`), which stays causal because the
last slot is never read by any byte (bytes read only patches before their own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _bound(x: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B, L) length bound as a (B, L, 1) tensor that broadcasts over the states."""
    return torch.as_tensor(x, device=like.device).long().expand(like.shape)[..., None]


def scan_boundaries(boundary_if: torch.Tensor) -> torch.Tensor:
    """Run the patch-length state machine given its decision table, without a loop over positions.

    boundary_if: (B, L, S) bool, entry [b, i, s] = "byte i starts a patch when the current
    patch already holds s + 1 bytes" (S = the longest patch; the entry for s = S - 1 must be
    True). Returns (B, L) boundaries, byte 0 always one. The states follow deterministically
    from the table, so the whole run is a composition of per-byte transition functions: a
    parallel prefix scan in log2(L) steps of composing (B, L, S) tables. Whatever a table
    entry at byte i depends on, the boundary at i depends on that and on the entries before i.
    """
    B, L, S = boundary_if.shape
    dev = boundary_if.device
    if L == 0:
        return boundary_if.new_zeros(B, 0)
    state = torch.arange(S, device=dev)  # state s = current patch holds s + 1 bytes
    table = torch.where(boundary_if, torch.zeros((), dtype=torch.long, device=dev), (state + 1).clamp(max=S - 1))
    # Inclusive prefix composition: comp[i] = t_i o t_{i-1} o ... o t_1 (byte 0 fixes the start state 0).
    comp = table.clone()
    comp[:, 0] = 0  # byte 0 starts a patch whatever came before
    offset = 1
    while offset < L:
        prev = comp[:, :-offset]  # functions of bytes up to i - offset
        cur = comp[:, offset:]
        # new[i](s) = cur[i](prev[i](s))
        comp = torch.cat([comp[:, :offset], torch.gather(cur, 2, prev)], dim=1)
        offset *= 2
    # State before byte i = comp[i-1](anything) (byte 0 resets), then the rule at byte i.
    before = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), comp[:, :-1, 0]], dim=1)
    b = torch.gather(boundary_if, 2, before[:, :, None]).squeeze(2)
    b[:, 0] = True
    return b


def enforce_patch_lengths(
    candidates: torch.Tensor, min_patch: int | torch.Tensor, max_patch: int | torch.Tensor, longest: int | None = None
) -> torch.Tensor:
    """Greedy left-to-right boundary selection, computed without a loop over positions.

    candidates: (B, L) bool, True where a patcher would like a patch to start. Returns (B, L)
    bool boundaries such that byte 0 starts a patch, a candidate is accepted only if the
    current patch already has >= min_patch bytes, and a boundary is forced once it has
    max_patch bytes. Exactly the sequential rule, as a parallel prefix scan over the small
    state machine "length of the current patch so far" (`scan_boundaries`).

    min_patch / max_patch may be (B, L) tensors: the bounds in force at each byte (the
    complexity-adaptive patchers). `longest` is then an upper bound of max_patch (the number
    of states); with tensor bounds it is required.
    """
    B, L = candidates.shape
    dev = candidates.device
    if L == 0:
        return candidates.clone()
    cand = candidates.clone()
    cand[:, 0] = True
    scalar = not torch.is_tensor(min_patch) and not torch.is_tensor(max_patch)
    if scalar and min_patch <= 1:
        # No minimum: only the max rule, which has a closed form. A forced boundary falls every
        # max_patch bytes after the last candidate.
        pos = torch.arange(L, device=dev).expand(B, L)
        last = torch.where(cand, pos, torch.zeros_like(pos)).cummax(dim=1).values
        dist = pos - last
        return cand | ((dist > 0) & (dist % max_patch == 0))
    if longest is None:
        if not scalar:
            raise ValueError("enforce_patch_lengths: tensor bounds need `longest` (the largest max_patch)")
        longest = int(max_patch)
    state = torch.arange(longest, device=dev)
    lo, hi = _bound(min_patch, cand), _bound(max_patch, cand).clamp(max=longest)
    boundary_if = (cand[:, :, None] & (state + 1 >= lo)) | (state + 1 >= hi)  # (B, L, S)
    return scan_boundaries(boundary_if)


@dataclass
class PatchInfo:
    """Everything the position system needs about one batch's patching. Shapes: B batch, L bytes, P slots."""

    boundaries: torch.Tensor  # (B, L) bool, byte starts a patch
    patch_ids: torch.Tensor  # (B, L) long, slot of each byte, in [0, P)
    pos_in_patch: torch.Tensor  # (B, L) long, bytes before it in its patch
    starts: torch.Tensor  # (B, P) long, first byte of each slot (L + k for padding slots)
    lengths: torch.Tensor  # (B, P) long, bytes in each slot (0 for padding)
    mask: torch.Tensor  # (B, P) bool, slot holds a real patch
    num_patches: torch.Tensor  # (B,) long, real patches (<= P)
    overflow: torch.Tensor  # (B,) long, boundaries dropped because the sequence had more patches than slots
    byte_positions: torch.Tensor  # (B, L) long, original (global) byte positions
    patch_positions: torch.Tensor  # (B, P) long, original position of each slot's first byte
    # What a byte may use at its own position when boundaries are decided with lookahead (lag
    # > 0): the patch holding byte i - lag stands in for byte i's own patch, so byte i reads
    # only slots < read_ids[i] (closed at least `lag` bytes before it) and its position
    # feature counts from that patch's start. With lag 0 they are patch_ids and pos_in_patch.
    read_ids: torch.Tensor | None = None  # (B, L) long
    read_pos: torch.Tensor | None = None  # (B, L) long
    lag: int = 0

    def __post_init__(self):
        if self.read_ids is None:
            self.read_ids, self.read_pos = self.patch_ids, self.pos_in_patch

    @property
    def num_slots(self) -> int:
        return self.starts.shape[1]


def patch_info(
    boundaries: torch.Tensor, num_slots: int, original_positions: torch.Tensor | None = None, lag: int = 0
) -> PatchInfo:
    """Vectorized patch bookkeeping from (B, L) boundaries; no loop over samples or patches.

    lag: the boundary at byte p depends on bytes up to p + lag (a lookahead patcher), so byte
    i may only use boundaries at bytes <= i - lag (`read_ids`, `read_pos`)."""
    B, L = boundaries.shape
    dev = boundaries.device
    b = boundaries.clone()
    b[:, 0] = True
    P = int(num_slots)
    raw_ids = b.long().cumsum(1) - 1
    pid = raw_ids.clamp(max=P - 1)
    pos = torch.arange(L, device=dev).expand(B, L)
    if original_positions is None:
        byte_positions = pos
    else:
        byte_positions = original_positions.to(dev).long().expand(B, L)
    starts = torch.full((B, P), L, dtype=torch.long, device=dev) + torch.arange(P, device=dev)
    starts = starts.scatter_reduce(1, pid, pos, reduce="amin", include_self=True)
    lengths = torch.zeros(B, P, dtype=torch.long, device=dev).scatter_add_(1, pid, torch.ones_like(pid))
    mask = lengths > 0
    total = raw_ids[:, -1] + 1
    num_patches = total.clamp(max=P)
    overflow = total - num_patches
    pos_in_patch = pos - torch.gather(starts, 1, pid)
    # Original position of each slot's first byte; padding slots continue past the last byte.
    last_pos = byte_positions[:, -1:]
    patch_positions = torch.where(
        mask,
        torch.gather(byte_positions, 1, starts.clamp(max=L - 1)),
        last_pos + 1 + torch.arange(P, device=dev) - num_patches[:, None],
    )
    read_ids = read_pos = None
    if lag > 0:
        # Byte i < lag has seen no decided boundary but byte 0's: it reads nothing (id 0).
        read_ids = torch.nn.functional.pad(pid[:, : max(L - lag, 0)], (min(lag, L), 0))
        read_pos = pos - torch.gather(starts, 1, read_ids)
    return PatchInfo(b, pid, pos_in_patch, starts, lengths, mask, num_patches, overflow, byte_positions, patch_positions,
                     read_ids, read_pos, lag)


def _row_offsets(batch: int, slots: int, index: torch.Tensor) -> torch.Tensor:
    return (torch.arange(batch, device=index.device) * slots).view(batch, *([1] * (index.dim() - 1)))


def segment_sum(values: torch.Tensor, patch_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, L, *F) -> (B, P, *F): sum of each slot's bytes. Row-wise index_add over the
    flattened (B * P) rows (its backward is a row gather), no expanded index tensor."""
    B, L = patch_ids.shape
    feat = values.shape[2:]
    rows = values.reshape(B * L, -1)
    idx = (patch_ids + _row_offsets(B, num_slots, patch_ids)).reshape(-1)
    out = rows.new_zeros(B * num_slots, rows.shape[1]).index_add(0, idx, rows)
    return out.view(B, num_slots, *feat)


def gather_slots(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, P, *F), index (B, *S) in [0, P) -> (B, *S, *F) by row-wise index_select."""
    B, P = values.shape[:2]
    feat = values.shape[2:]
    rows = values.reshape(B * P, -1)
    idx = (index + _row_offsets(B, P, index)).reshape(-1)
    return rows.index_select(0, idx).view(*index.shape, *feat)
