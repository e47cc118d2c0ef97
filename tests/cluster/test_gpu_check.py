"""`hyena-glt bench gpu` (make gpu-check) without CUDA: the CPU fallback runs every code path
but the CUDA calls (tiny forward determinism and fp64 agreement, the torchrun training cases,
the FLOPs/MFU report), and the model-FLOPs count agrees with the model's own layers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from hyena_glt import HyenaGLTConfig, build_causal_lm
from launch.bench import gpu
from launch.training.config import TrainConfig


@pytest.mark.distributed  # the training cases run under torchrun
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback runs only where there is no CUDA device")
def test_cpu_fallback_writes_report_and_exits_zero(tmp_path):
    out = tmp_path / "out"
    rc, stdout, _ = run_cli("bench", "gpu", "--out", out, "--lengths", "256", "--steps", "2", "--peak-tflops", "100")
    assert rc == 0, stdout
    result = json.loads((out / gpu.RESULT_JSON).read_text())
    assert result["train"]["peak_tflops"] == 100
    text = (out / gpu.RESULT_TXT).read_text()
    assert result["passed"] and not result["cuda"]
    p = result["parity"]
    assert p["passed"] and p["cpu_repeat_bitwise_equal"] and p["cpu_fp32_vs_fp64"] <= gpu.PARITY_TOLERANCE
    assert "cuda_vs_cpu" not in p and "CUDA vs CPU: skipped (no CUDA device)" in text
    cases = {c["name"]: c for c in result["train"]["cases"]}
    assert set(cases) == {"hyena-256", "attention-only-256", "token-merging-256"}
    assert cases["attention-only-256"]["pattern"] == "*" * 8
    for c in cases.values():
        assert "error" not in c and c["tokens_per_s"] > 0 and len(c["losses"]) == 2
    for name in ("hyena-256", "attention-only-256"):
        c = cases[name]
        # MFU by hand, from the report's raw numbers: FLOPs per token, time per step, the peak given
        model = TrainConfig.load(gpu.CPU_CONFIG, [f"model.pattern={c['pattern']}"]).model
        f = c["forward_flops_per_token"]
        assert f["matmul"] == 2 * (_linear_macs(model) + model.d_model * model.vocab_size)  # every Linear + the output
        assert f["attention"] == c["pattern"].count("*") * 2 * model.d_model * (256 + 1)
        assert f["total"] == f["matmul"] + f["attention"] + f["conv"] and (f["conv"] > 0) == ("H" in c["pattern"])
        assert c["train_flops_per_token"] == 3 * f["total"]  # forward + backward (twice the forward)
        tokens = c["global_batch"] * c["seq_len"]
        assert tokens == 1024 and len(c["step_tokens_per_s"]) == 2 and all(t > 0 for t in c["step_tokens_per_s"])
        assert c["tokens_per_s"] == c["step_tokens_per_s"][1]  # the median of the steps after the first (warm-up)
        flops_per_s = c["tokens_per_s"] * c["train_flops_per_token"]
        assert c["model_tflops_per_s"] == pytest.approx(flops_per_s / 1e12, rel=1e-12)
        assert c["mfu"] == pytest.approx(flops_per_s / (1 * 100e12), rel=1e-12)  # 1 process, --peak-tflops 100
    assert "mfu" not in cases["token-merging-256"]  # the FLOPs formula counts the plain model only
    assert result["train"]["hyena_vs_attention"]["256"] == pytest.approx(
        cases["hyena-256"]["tokens_per_s"] / cases["attention-only-256"]["tokens_per_s"])
    assert "striped Hyena vs attention-only tokens/s: 256 " in text and "result: PASS" in text


def _linear_macs(cfg: HyenaGLTConfig) -> int:
    with torch.device("meta"):
        model = build_causal_lm(cfg, initialize=False)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("pattern", ["SDH*", "****", "SDHSDH"])
def test_flops_count_every_matmul_of_the_model(pattern):
    cfg = HyenaGLTConfig(pattern=pattern, d_model=64, num_heads=4, num_filter_groups=8, max_seq_len=4096)
    L = 4096
    f = gpu.forward_flops_per_token(cfg, L)
    # Every linear layer once per token, plus the (tied) output layer: 2 FLOPs per multiply-add.
    assert f["matmul"] == 2 * (_linear_macs(cfg) + cfg.d_model * cfg.vocab_size)
    assert f["attention"] == pattern.count("*") * 2 * cfg.d_model * (L + 1)
    assert (f["conv"] > 0) == any(c in pattern for c in "SDH")
    assert gpu.train_flops_per_token(cfg, L) == 3 * f["total"]


def test_conv_flops_are_the_textbook_count():
    from hyena_glt.kinds import direct_conv_flops, fft_conv_flops

    assert direct_conv_flops(10, 7) == 2 * 10 * 7  # S, D and the featurizer: a direct FIR
    assert direct_conv_flops(10, 128) == 2 * 10 * 128
    n = 2 * 8192  # H: FFT convolution of size 2L: three transforms and the products
    assert fft_conv_flops(10, 8192) == pytest.approx(10 * (7.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / 8192)


def test_1b_matmul_flops_are_6n():
    """For the 1B config the matmul term is the familiar 6 N per token (the norms and filters
    are a negligible share of N); attention and convolutions come on top."""
    cfg = TrainConfig.load(gpu.GPU_CONFIG).model
    with torch.device("meta"):
        n = build_causal_lm(cfg, initialize=False).num_parameters()
    f = gpu.forward_flops_per_token(cfg, 8192)
    assert 3 * f["matmul"] == pytest.approx(6 * n, rel=2e-3)
    assert 0 < f["conv"] < 0.01 * f["matmul"] and 0 < f["attention"] < 0.2 * f["matmul"]
