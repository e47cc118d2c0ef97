"""Patch bookkeeping: exact greedy min/max enforcement and slot/padding/overflow accounting."""

import pytest
import torch

from hyena_glt.blt.segments import enforce_patch_lengths, gather_slots, patch_info, segment_sum


def sequential_reference(cand: torch.Tensor, min_patch: int, max_patch: int) -> torch.Tensor:
    rows = []
    for row in cand.tolist():
        b, t = [True], 1
        for c in row[1:]:
            if (c and t >= min_patch) or t >= max_patch:
                b.append(True)
                t = 1
            else:
                b.append(False)
                t += 1
        rows.append(b)
    return torch.tensor(rows)


@pytest.mark.parametrize("min_patch,max_patch", [(1, 1), (1, 4), (2, 5), (3, 3), (4, 16), (2, 2)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_enforce_matches_the_sequential_rule(min_patch, max_patch, rate):
    g = torch.Generator().manual_seed(min_patch * 100 + max_patch)
    cand = torch.rand(3, 203, generator=g) < rate
    b = enforce_patch_lengths(cand, min_patch, max_patch)
    assert torch.equal(b, sequential_reference(cand, min_patch, max_patch))
    info = patch_info(b, 203)
    for row in range(3):
        n = int(info.num_patches[row])
        lengths = info.lengths[row, :n]
        assert (lengths[:-1] >= min_patch).all() and (lengths <= max_patch).all()


def test_patch_info_slots_padding_and_overflow():
    b = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]).bool()
    info = patch_info(b, 5, original_positions=torch.arange(100, 110)[None])
    assert info.patch_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    assert info.pos_in_patch[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2, 3]
    assert info.lengths[0].tolist() == [3, 2, 1, 4, 0] and info.mask[0].tolist() == [True] * 4 + [False]
    assert info.patch_positions[0, :4].tolist() == [100, 103, 105, 106]
    assert info.num_patches.tolist() == [4, 5] and info.overflow.tolist() == [0, 1]
    # Overflowing bytes fold into the last slot; nothing is lost.
    assert info.lengths[1].tolist() == [1, 1, 1, 1, 6] and int(info.lengths.sum()) == 20


def test_segment_sum_and_gather():
    pid = torch.tensor([[0, 0, 1, 2, 2, 2]])
    v = torch.arange(6.0).view(1, 6, 1)
    assert segment_sum(v, pid, 4)[0, :, 0].tolist() == [1.0, 2.0, 12.0, 0.0]
    slots = torch.tensor([[[10.0], [20.0], [30.0]]])
    assert gather_slots(slots, torch.tensor([[2, 0]]))[0, :, 0].tolist() == [30.0, 10.0]
