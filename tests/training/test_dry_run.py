"""`hyena-glt train --dry-run --world-size N`: every layout and batch rule for a world size,
one line naming the rule on failure (exit 2), a memory estimate otherwise; no process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"  # d_model 64, 4 heads, 8 filter groups, 8 layers, seq_len 512


def dry_run(world: int, *overrides: str, config: Path = TINY):
    return run_cli("train", "--dry-run", "--world-size", world, "--config", config, *overrides)


INVALID = [
    pytest.param(3, ["parallel.tp=2"], "world size 3 is not divisible by tp*cp*pp", id="world-not-divisible"),
    pytest.param(4, ["parallel.tp=4", "model.num_heads=2"], "num_heads=2 is not divisible by tp*cp", id="tp-heads"),
    pytest.param(2, ["parallel.cp=2", "train.seq_len=510"], "sequence length 510 is not divisible by 2*cp = 4", id="cp-seq-len"),
    pytest.param(2, ["parallel.vpp=2"], "vpp=2 needs vpp >= 2 and pp >= 2", id="vpp-without-pp"),
    pytest.param(8, ["parallel.pp=4", "parallel.vpp=4"], "8 layers cannot fill pp*vpp = 4*4 = 16", id="vpp-layers"),
    pytest.param(2, ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=2", "train.global_batch_size=6"],
                 "needs a multiple of pp=2 micro-batches, got 3", id="vpp-micro-batches"),
    pytest.param(4, ["train.micro_batch_size=8"], "global_batch_size=16 must be a multiple of train.micro_batch_size "
                 "x dp = 8 x 4", id="global-batch-dp"),
    pytest.param(1, ["train.micro_batch_size=3"], "multiple of train.micro_batch_size=3", id="global-batch-micro"),
    pytest.param(2, ["parallel.sp=true"], "sequence parallel needs tp > 1", id="sp-without-tp"),
    pytest.param(4, ["parallel.tp=4", "parallel.sp=true", "train.seq_len=6"], "not divisible by tp=4 (sequence "
                 "parallel)", id="sp-seq-len"),
    pytest.param(4, ["parallel.cp=4", "train.seq_len=32"], "shorter than the 6-position halo", id="cp-halo"),
    pytest.param(2, ["zero.stage=3", "parallel.pp=2"], "zero.stage=3 shards parameters", id="zero3-pp"),
    pytest.param(4, ["parallel.cp=4", "train.seq_len=32", "model.patching=static", "model.pattern=DH*D"],
                 "shorter than the 6-position halo", id="token-merging-byte-encoder-halo"),
]


@pytest.mark.parametrize("world,overrides,rule", INVALID)
def test_invalid_layouts_are_refused_in_one_line(world, overrides, rule):
    rc, out, err = dry_run(world, *overrides)
    assert rc == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyena-glt train: error: "), err
    assert rule in lines[0], lines[0]
    assert not dist.is_initialized()


def test_a_valid_layout_prints_the_memory_estimate():
    rc, out, err = dry_run(8, "parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "zero.stage=1",
                           "train.micro_batch_size=2")
    assert rc == 0, err
    assert "valid for world size 8" in out and "tp=2 cp=1 pp=2 vpp=2 sp=off dp=2" in out
    assert "dp 2 x 4 micro-batches x 2 sequences" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [r[0] for r in rows] == ["0", "1"]  # one row per pipeline rank
    assert not dist.is_initialized()


def test_the_estimate_follows_the_stated_formulas():
    from launch.plan.memory import estimate
    from launch.training.config import TrainConfig
    from megatron_adapters.sharding import canonical_params

    def one(world, *overrides):
        tc = TrainConfig.load(TINY, list(overrides))
        return estimate(tc, tc.layout_for(world))

    n = sum(t.numel() for t in canonical_params(TrainConfig.load(TINY).model).values())
    (single,) = one(1)
    assert single.params == n and (single.weights, single.grads, single.optimizer) == (4 * n, 4 * n, 8 * n)
    # ZeRO over dp=4: stage 1 the optimizer (+ fp32 master), 2 also grads, 3 also weights
    stages = [one(4, f"zero.stage={z}", "train.micro_batch_size=4")[0] for z in (1, 2, 3)]
    assert [(e.weights, e.grads, e.optimizer) for e in stages] == [
        (4 * n, 4 * n, 3 * n), (4 * n, n, 3 * n), (n, n, 2 * n)]
    # TP halves the split tensors; the two pipeline ranks hold every parameter once (plus the tied copy)
    tp2 = one(2, "parallel.tp=2")[0]
    assert n / 2 < tp2.params < n
    pp = one(2, "parallel.pp=2")
    emb = TrainConfig.load(TINY).model.vocab_size * 64
    assert sum(e.params for e in pp) == n + emb
    # activation checkpointing keeps less per micro-batch; 1F1B's first rank holds pp micro-batches
    assert single.activations_recompute < single.activations
    assert [e.in_flight for e in pp] == [2, 1]


def test_world_size_and_dry_run_go_together():
    rc, _, err = run_cli("train", "--dry-run", "--config", TINY)
    assert rc == 2 and "--dry-run needs --world-size" in err
    rc, _, err = run_cli("train", "--world-size", "2", "--config", TINY)
    assert rc == 2 and "--world-size goes with --dry-run" in err
