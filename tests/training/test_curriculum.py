"""Sequence-length warm-up schedule and batch reshaping."""

import pytest
import torch

from launch.training.curriculum import CurriculumConfig, apply_curriculum, seq_len_at, validate_curriculum


def test_linear_schedule_endpoints_rounding_and_monotone():
    cur = CurriculumConfig(enabled=True, start_seq_len=256, warmup_steps=100, schedule="linear", multiple_of=64, mode="truncate")
    lens = [seq_len_at(s, cur, 4096) for s in range(1, 130)]
    assert lens[0] == 256 and lens[100] == 4096 and lens[-1] == 4096
    assert all(x % 64 == 0 for x in lens) and lens == sorted(lens)
    assert seq_len_at(51, cur, 4096) == (256 + (4096 - 256) * 50 // 100) // 64 * 64


def test_geometric_split_lengths_divide_the_final_length():
    cur = CurriculumConfig(enabled=True, start_seq_len=128, warmup_steps=40, schedule="geometric", multiple_of=64)
    lens = [seq_len_at(s, cur, 3072) for s in range(1, 45)]
    assert lens[0] == 128 and lens[-1] == 3072 and lens == sorted(lens)
    assert all(3072 % x == 0 for x in lens)
    assert len(set(lens)) >= 4


def test_disabled_and_train_section_duck_typing():
    class Train:  # the trainer's `train` section: .seq_len and .curriculum
        seq_len = 1024
        curriculum = CurriculumConfig(enabled=True, start_seq_len=256, warmup_steps=10)

    assert seq_len_at(1, Train()) == 256 and seq_len_at(11, Train()) == 1024
    assert seq_len_at(1, CurriculumConfig(), 1024) == 1024


def test_apply_curriculum_split_and_truncate():
    ids = torch.arange(2 * 8).view(2, 8)
    batch = {"input_ids": ids, "labels": ids + 100, "loss_weights": torch.ones(2, 8), "seq_type": torch.tensor([0, 1])}
    s = apply_curriculum(batch, 4, "split")
    assert s["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(s["labels"], s["input_ids"] + 100)  # shifted labels stay aligned
    assert s["seq_type"].tolist() == [0, 0, 1, 1]
    t = apply_curriculum(batch, 3, "truncate")
    assert t["input_ids"].shape == (2, 3) and t["seq_type"].shape == (2,)
    assert apply_curriculum(batch, 8)["input_ids"] is ids


@pytest.mark.parametrize(
    "kw,seq_len,cp,field",
    [
        (dict(start_seq_len=2048), 1024, 1, "start_seq_len"),
        (dict(start_seq_len=32, multiple_of=64), 1024, 1, "start_seq_len"),
        (dict(multiple_of=96, start_seq_len=96), 1024, 1, "multiple_of"),
        (dict(multiple_of=2, start_seq_len=64), 1024, 2, "multiple_of"),
        (dict(final_seq_len=4096), 1024, 1, "final_seq_len"),
    ],
)
def test_validation_names_the_field(kw, seq_len, cp, field):
    with pytest.raises(ValueError, match=field):
        validate_curriculum(CurriculumConfig(enabled=True, warmup_steps=10, **kw), seq_len, cp)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule"):
        CurriculumConfig(schedule="cosine")
    with pytest.raises(ValueError, match="mode"):
        CurriculumConfig(mode="pack")
