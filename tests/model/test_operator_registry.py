"""The layer-kind registry: a kind declared once, outside the package, reaches every reader.

tests/support/toy_operator.py defines and registers `T` (a gated causal convolution) in one
file; nothing in hyena_glt, megatron_adapters or launch names it. Here it
* trains under TP=2 x CP=2 (4 processes, torchrun, gloo, CPU; the plug-in reaches them through
  HYENA_GLT_PLUGINS) with the per-step losses and gradient norms of one process (1e-5
  relative), next to the built-in H and * blocks;
* enters `train --dry-run`'s memory estimate (its activations, its TP split, its CP halo);
* enters `bench gpu`'s model FLOPs (the function, and the CPU fallback's case plan);
* runs with the inference cache: what the cache holds is what the kind declares, and cached
  generation equals recomputation;
and the registry's own rules give one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli
from support import toy_operator
from support.training import (
    CONFIG,
    STEPS,
    assert_close,
    child_env,
    losses,
    metrics,
    train,
)

from hyena_glt import HyenaGLTConfig, build_causal_lm
from hyena_glt.cache import layer_state_shapes
from hyena_glt.inference import generate
from hyena_glt.kinds import (
    CACHE_KV,
    KINDS,
    PLUGINS_ENV,
    PluginError,
    direct_conv_flops,
    fft_conv_flops,
    import_plugins,
    layer_kind,
    register_kind,
)

T = toy_operator.CODE
PLUGIN = "support.toy_operator"  # as the tests import it: tests/ on the children's PYTHONPATH too


def small(pattern: str, **kw) -> HyenaGLTConfig:
    base = dict(pattern=pattern, d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=256,
                medium_filter_len=16, modal_order=4, seed=3)
    return HyenaGLTConfig(**(base | kw))


# ---------------------------------------------------------------------------- the registry's rules


def test_the_plugin_kind_is_registered_and_used_by_the_model():
    assert layer_kind(T) is toy_operator.KIND and list(KINDS)[:4] == ["S", "D", "H", "*"] and T in KINDS
    model = build_causal_lm(small(f"S{T}*"))
    assert isinstance(model.model.layers[1].mixer, toy_operator.GatedConv)
    local = small("TT", local_encoder_pattern=T, local_decoder_pattern=f"{T}*", patching="static")
    assert local.short_conv_halo() == toy_operator.TAPS - 1  # the token-merging blocks accept it too


def test_unknown_codes_and_broken_plugins_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"pattern: unknown layer code\(s\) \['Q'\]; registered: S, D, H, \*, .*T"):
        small("SQ")
    with pytest.raises(ValueError, match="local_encoder_pattern: need one or more layer codes from"):
        small("S", local_encoder_pattern="Q", patching="static")
    with pytest.raises(PluginError, match="HYENA_GLT_PLUGINS: cannot import plug-in module 'no_such_plugin_mod': "
                       "ModuleNotFoundError") as err:
        import_plugins(" support.toy_operator , no_such_plugin_mod")
    assert "\n" not in str(err.value)
    # The CLI, in a process whose environment names a module that is not there.
    env = dict(child_env(), **{PLUGINS_ENV: "no_such_plugin_mod"})
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--dry-run", "--world-size", "1", "--config",
                           str(CONFIG)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot import plug-in module 'no_such_plugin_mod': ModuleNotFoundError" in lines[0]


def test_register_refuses_a_taken_code_and_a_contradicting_tp_rule():
    with pytest.raises(ValueError, match=r"layer kind 'T' \(toy_gated_conv, from .*\) is already registered"):
        register_kind(dataclasses.replace(toy_operator.KIND))
    with pytest.raises(ValueError, match="splits mixer parameter 'out_proj.weight' on dim 0, but kind 'S' splits it on dim 1"):
        register_kind(dataclasses.replace(toy_operator.KIND, code="U", tp_split={"out_proj.weight": 0}))
    with pytest.raises(ValueError, match=re.escape("code must be one character other than '|'")):
        dataclasses.replace(toy_operator.KIND, code="|")
    assert "U" not in KINDS


# ---------------------------------------------------------------------------- inference cache


def test_cache_holds_what_each_kind_declares_and_cached_generation_equals_recompute():
    cfg = small(f"{T}S*{T}HD")
    model = build_causal_lm(cfg).eval()
    ids = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        logits, cache = model.prefill(ids[:, :20])
        steps = torch.cat([logits] + [model.step(ids[:, t], cache)[:, None] for t in range(20, 32)], 1)
    assert (steps - full).abs().max() <= 1e-5 * full.abs().max()
    declared = layer_state_shapes(cfg, 32)
    for i, entry in cache.layers.items():
        kv = layer_kind(cfg.layers[i]).cache == CACHE_KV
        held = {k: (t[:, :, : entry["n"]] if t.dim() == 4 else t[:, : entry["n"]]) if kv else t
                for k, t in entry.items() if torch.is_tensor(t)}
        assert {k: tuple(t.shape[1:]) for k, t in held.items()} == declared[i], (i, cfg.layers[i])
    # prompts of different lengths: each prefilled alone, stacked by each kind's cache layout
    prompts = [torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 11)]
    kw = dict(temperature=0.8, top_k=20, seed=5)
    cached = generate(model, prompts, 6, **kw)
    recomputed = generate(model, prompts, 6, use_cache=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed))


# ---------------------------------------------------------------------------- dry run and FLOPs


def test_dry_run_estimates_the_plugin_kind(tmp_path):
    from launch.plan.memory import estimate
    from launch.training.config import TrainConfig
    from megatron_adapters import ParallelConfig, ParallelConfigError, check_layout
    from megatron_adapters.sharding import canonical_params

    def one(world, *overrides):
        tc = TrainConfig.load(CONFIG, list(overrides))
        return tc, estimate(tc, tc.layout_for(world))[0]

    tc, toy = one(4, f"model.pattern={T}{T}{T}{T}", "parallel.tp=2", "parallel.cp=2")
    _, short = one(4, "model.pattern=SSSS", "parallel.tp=2", "parallel.cp=2")
    # Its TP rules: the projection, taps and output split in two, the rest held whole.
    split = {"gate_value_proj.weight", "taps", "out_proj.weight"}
    params = canonical_params(tc.model)
    mixer = [n for n in params if ".mixer." in n]
    assert {n.rsplit(".mixer.", 1)[1] for n in mixer} == split
    whole = sum(t.numel() for n, t in params.items() if n not in mixer and ".mlp." not in n and "embed" not in n)
    halves = sum(t.numel() // 2 for n, t in params.items() if n in mixer or ".mlp." in n or "embed" in n)
    assert toy.params == whole + halves
    # Its activations: per token, the block's 4 x d_model + MLP, and the kind's own 5 x d_model / tp.
    b, s, tp = tc.train.micro_batch_size, tc.train.seq_len // 2, 2
    per_layer_delta = toy_operator.activations(tc.model, tc.train.seq_len, tp) - layer_kind("S").activations(
        tc.model, tc.train.seq_len, tp)
    assert toy.activations - short.activations == pytest.approx(4 * per_layer_delta * b * s * 4, abs=1)
    rc, out, err = run_cli("train", "--dry-run", "--world-size", 4, "--config", CONFIG, f"model.pattern={T}{T}{T}{T}",
                           "parallel.tp=2", "parallel.cp=2")
    assert rc == 0 and f"{toy.params:,}" in out, err
    # Its CP halo: chunks shorter than TAPS - 1 positions are refused.
    with pytest.raises(ParallelConfigError, match=f"shorter than the {toy_operator.TAPS - 1}-position halo"):
        check_layout(ParallelConfig(cp=4), small(T * 4), seq_length=24)


def _linear_macs(cfg: HyenaGLTConfig) -> int:
    with torch.device("meta"):
        model = build_causal_lm(cfg, initialize=False)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_bench_gpu_counts_the_plugin_kind(tmp_path):
    from launch.bench import gpu
    from launch.training.config import TrainConfig

    L = 1024
    cfg = small(f"{T}*{T}H", max_seq_len=L)
    f = gpu.forward_flops_per_token(cfg, L)
    D = cfg.d_model
    assert f["matmul"] == 2 * (_linear_macs(cfg) + D * cfg.vocab_size)  # T's projections counted once each
    assert f["conv"] == pytest.approx(2 * direct_conv_flops(D, toy_operator.TAPS) + direct_conv_flops(3 * D, 3)
                                      + fft_conv_flops(D, L))
    assert f["attention"] == 2 * D * (L + 1)
    # The CPU fallback plans its cases (and their MFU denominators) from the same function.
    config = tmp_path / "toy.yaml"
    config.write_text(CONFIG.read_text().replace('pattern: "SDH*SDH*"', f'pattern: "{T}H*{T}"'))
    cases = gpu.plan_cases(config, [256], 1024, 2, tmp_path / "packed", tmp_path, [], "fp32", 1)
    hyena = next(c for c in cases if c["kind"] == "hyena")
    assert hyena["pattern"] == f"{T}H*{T}"
    model_cfg = TrainConfig.load(config).model
    assert hyena["train_flops_per_token"] == 3 * gpu.forward_flops_per_token(model_cfg, 256)["total"] > 0


# ---------------------------------------------------------------------------- training under TP x CP


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    from conftest import genome_path

    lam = genome_path("lambda_phage.fasta.gz")
    d = tmp_path_factory.mktemp("packs")
    for out, val in (("train", "0"), ("val", "1")):
        subprocess.run([sys.executable, "-m", "launch.cli", "pack", str(lam), "--out", str(d / out), "--seq-len", "128",
                        "--val-fraction", val, "--progress", "none"], check=True, cwd=REPO, env=child_env(),
                       capture_output=True)
    return d


@pytest.mark.distributed
def test_plugin_kind_trains_under_tp2_cp2_like_one_process(packs, tmp_path, monkeypatch):
    # Only the environment carries the plug-in: the children import it as the registry is first read.
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    model = [f"model.pattern={T}H*{T}", "checkpoint.dir=null"]
    single, parallel = tmp_path / "single", tmp_path / "tp2-cp2"
    train(packs, single, 1, *model, launcher="python")
    train(packs, parallel, 4, *model, "parallel.tp=2", "parallel.cp=2")
    ref = losses(single)
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref)
    assert_close(losses(parallel), ref)
    norms = [[r["grad_norm"] for r in metrics(out) if "loss" in r] for out in (parallel, single)]
    assert_close(*norms)
    vals = [[r["val_loss"] for r in metrics(out) if "val_loss" in r][-1:] for out in (parallel, single)]
    assert_close(*vals)
