"""The shipped configs build, validate and fit their stated parallel layouts (no allocation)."""

from pathlib import Path

import pytest
import torch

from hyena_glt import HyenaGLTForCausalLM
from launch.training.config import TrainConfig, apply_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# config -> (world size the header comments promise, parameter range in billions)
CLUSTER = {"cluster_1b.yaml": (64, 0.8, 1.5), "cluster_7b.yaml": (256, 5.0, 9.0), "cluster_40b.yaml": (2048, 30.0, 50.0)}


@pytest.mark.parametrize("name", sorted(CLUSTER))
def test_cluster_config_layout_and_size(name):
    from megatron_adapters.parallel_config import ParallelConfig, check_layout

    world, lo, hi = CLUSTER[name]
    cfg = TrainConfig.load(CONFIGS / name)
    p = cfg.parallel
    pcfg = ParallelConfig(tp=p.tp, cp=p.cp, pp=p.pp, sp=p.sp)
    check_layout(pcfg, cfg.model, world_size=world, seq_length=cfg.train.seq_len)
    dp = world // (p.tp * p.cp * p.pp)
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0
    with torch.device("meta"):  # counts parameters without allocating 40B of them
        n = HyenaGLTForCausalLM(cfg.model, initialize=False).num_parameters() / 1e9
    assert lo <= n <= hi, f"{name}: {n:.2f}B parameters"


def test_tiny_config_loads():
    cfg = TrainConfig.load(CONFIGS / "tiny.yaml")
    assert cfg.model.num_layers == 8 and set(cfg.model.layers) == set("SDH*")


def test_dotted_overrides(tmp_path):
    cfg = TrainConfig.load(CONFIGS / "tiny.yaml", ["train.steps=7", "parallel.tp=2", "model.d_model=128", "data.train={a: 0.7, b: 0.3}"])
    assert cfg.train.steps == 7 and cfg.parallel.tp == 2 and cfg.model.d_model == 128
    assert cfg.data.train == {"a": 0.7, "b": 0.3}
    with pytest.raises(ValueError, match="key=value"):
        apply_override({}, "train.steps")


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.global_batch_size=10", "global_batch_size"),
        ("parallel.sp=true", "parallel.sp"),
        ("train.seq_len=510", "seq_len"),
        ("train.precision=fp8", "precision"),
        ("train.stepz=3", "stepz"),
    ],
)
def test_invalid_training_config(override, msg):
    extra = ["parallel.cp=2"] if "seq_len" in override else []
    with pytest.raises(ValueError, match=msg):
        TrainConfig.load(CONFIGS / "tiny.yaml", [override, *extra])


def test_zero3_with_pipeline_is_refused():
    with pytest.raises(ValueError, match="zero.stage=3"):
        TrainConfig.load(CONFIGS / "tiny.yaml", ["zero.stage=3", "parallel.pp=2"])
