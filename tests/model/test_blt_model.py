"""The U-shaped causal LM: causality for every patcher, exact padding, min/max, gradients, I/O."""

import pytest
import torch

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM, build_causal_lm, load_causal_lm
from hyena_glt.blt import BLTForCausalLM

torch.set_num_threads(2)

PATCHERS = [
    ("static", {}),
    ("entropy", {"entropy_mode": "threshold"}),
    ("entropy", {"entropy_mode": "monotonic"}),
    ("entropy", {"entropy_mode": "topk", "entropy_window": 8}),
    ("learned", {"merge_relaxation": "ste"}),
    ("learned", {"merge_relaxation": "soft"}),
]


def tiny(patching="static", **kw) -> HyenaGLTConfig:
    base = dict(pattern="SD*", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=512, medium_filter_len=32,
                patching=patching, patch_size=3 if patching == "static" else 4, min_patch=2, max_patch=6)
    return HyenaGLTConfig(**{**base, **kw})


def perturbed_pair(L=160, j=97, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(4, 260, (batch, L), generator=g)
    b = a.clone()
    b[:, min(j, L - 1)] = (a[:, min(j, L - 1)] - 4 + 1) % 256 + 4
    return a, b


def model_for(patching, kw, dtype=torch.float32, **extra):
    m = build_causal_lm(tiny(patching, **{**kw, **extra})).to(dtype).eval()
    if patching != "static":
        m.calibrate_patcher(perturbed_pair()[0])  # a realistic boundary rate (about 1 in 4)
    return m


def assert_causal_bit_exact(patching, kw):
    """Byte 97 changed: every logit before it identical, some after it different. Returns the
    first output (its patch_info) for further checks."""
    m = model_for(patching, kw)
    a, b = perturbed_pair()
    with torch.no_grad():
        oa, ob = m(a), m(b)
    assert 1 < oa.patch_info.num_patches.min() < 160  # really merging
    assert torch.equal(oa.logits[:, :97], ob.logits[:, :97])
    assert not torch.equal(oa.logits[:, 97:], ob.logits[:, 97:])
    return m, oa


def assert_causal_with_long_filters_fp64(patching, kw):
    # H layers in the global model and the decoder: FFT roundoff only (1e-16 level).
    m = model_for(patching, kw, torch.float64, pattern="SDH*", medium_filter_len=128, local_decoder_pattern="SH")
    a, b = perturbed_pair(L=200, j=150)
    with torch.no_grad():
        la, lb = m(a).logits, m(b).logits
    assert (la[:, :150] - lb[:, :150]).abs().max() < 1e-12
    assert (la[:, 150:] - lb[:, 150:]).abs().max() > 1e-6


@pytest.mark.parametrize("patching,kw", PATCHERS)
def test_causality_bit_exact_without_fft(patching, kw):
    assert_causal_bit_exact(patching, kw)


@pytest.mark.parametrize("patching,kw", [PATCHERS[0], PATCHERS[1], PATCHERS[4]])
def test_causality_with_long_fft_filters_fp64(patching, kw):
    assert_causal_with_long_filters_fp64(patching, kw)


@pytest.mark.parametrize("patching,kw", [PATCHERS[0], PATCHERS[1], PATCHERS[4]])
def test_patch_budget_padding_is_exact(patching, kw):
    a, _ = perturbed_pair()
    tight = model_for(patching, kw, patch_budget=0.5)  # 80 slots, more than the patches
    loose = model_for(patching, kw, patch_budget=1.0)  # 160 slots
    with torch.no_grad():
        ot, ol = tight(a), loose(a)
    assert ot.patch_info.num_slots == 80 and ol.patch_info.num_slots == 160
    assert int(ot.patch_info.overflow.sum()) == 0
    assert torch.equal(ot.patch_info.boundaries, ol.patch_info.boundaries)
    torch.testing.assert_close(ot.logits, ol.logits, rtol=0, atol=1e-6)  # SDPA tiling may differ with P
    # Without attention in the global model the padded slots change nothing, bit for bit.
    t2, l2 = model_for(patching, kw, pattern="SD", patch_budget=0.5), model_for(patching, kw, pattern="SD", patch_budget=1.0)
    with torch.no_grad():
        assert torch.equal(t2(a).logits, l2(a).logits)


def test_overflowing_the_budget_stays_causal():
    m = model_for("static", {}, patch_budget=0.2, max_patch=6, min_patch=1)  # 32 slots for 54 codons
    a, b = perturbed_pair()
    with torch.no_grad():
        oa, ob = m(a), m(b)
    assert int(oa.patch_info.overflow.min()) > 0
    assert torch.equal(oa.logits[:, :97], ob.logits[:, :97])


@pytest.mark.parametrize("patching,kw", PATCHERS)
def test_boundaries_respect_min_and_max(patching, kw):
    m = model_for(patching, kw, min_patch=2, max_patch=5, patch_size=3)
    a, _ = perturbed_pair(L=300)
    with torch.no_grad():
        info = m(a).patch_info
    for r in range(a.shape[0]):
        n = int(info.num_patches[r])
        lengths = info.lengths[r, :n]
        assert int(lengths[:-1].min()) >= 2 and int(lengths.max()) <= 5
    assert int(info.lengths.sum()) == a.numel()


def test_static_patches_are_codons():
    m = model_for("static", {}, min_patch=1)
    a, _ = perturbed_pair(L=12)
    info = m(a).patch_info
    assert info.patch_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("relaxation", ["ste", "soft"])
def test_learned_boundary_scores_get_gradient_from_the_lm_loss(relaxation):
    m = build_causal_lm(tiny("learned", merge_relaxation=relaxation, compression_loss_weight=0.0)).train()
    a, _ = perturbed_pair()
    out = m(a, labels=a)
    scores = out.patcher.scores
    scores.retain_grad()
    out.loss.backward()
    assert scores.grad is not None and scores.grad[:, 1:].abs().sum() > 0
    merger = m.model.patcher
    for p in (merger.bias, merger.sim_scale, merger.pattern_conv, merger.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_learned_compression_term_pulls_the_rate_to_the_target():
    m = build_causal_lm(tiny("learned", min_patch=1, max_patch=16, patch_size=4, compression_loss_weight=1.0)).train()
    a, _ = perturbed_pair()
    merger = m.model.patcher
    with torch.no_grad():
        merger.bias.fill_(3.0)  # far too many boundaries
    out = m(a, labels=a)
    assert out.aux_loss_sum > 0 and out.loss_sum > out.lm_loss_sum
    out.aux_loss_sum.backward()
    assert merger.bias.grad.item() > 0  # gradient descent lowers the bias: fewer boundaries


def test_entropy_model_trains_jointly_and_aux_loss_only_in_training():
    m = build_causal_lm(tiny("entropy"))
    a, _ = perturbed_pair()
    m.train()
    out = m(a, labels=a)
    assert out.aux_loss_sum is not None and torch.allclose(out.loss_sum, out.lm_loss_sum + out.aux_loss_sum)
    out.loss.backward()
    assert m.model.patcher.lm.embed.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        ev = m(a, labels=a)
    assert torch.equal(ev.loss_sum, ev.lm_loss_sum)
    frozen = build_causal_lm(tiny("entropy", entropy_joint=False)).train()
    fo = frozen(a, labels=a)
    fo.loss.backward()
    assert fo.aux_loss_sum is None and frozen.model.patcher.lm.embed.weight.grad is None


@pytest.mark.parametrize("patching", ["static", "entropy", "learned"])
def test_loss_sums_add_up_across_a_batch_split(patching):
    """What DP relies on: sum of per-shard (loss_sum, weight_sum) == the whole batch's."""
    m = build_causal_lm(tiny(patching)).train()
    a, _ = perturbed_pair(batch=4)
    full = m(a, labels=a)
    parts = [m(a[i : i + 2], labels=a[i : i + 2]) for i in (0, 2)]
    torch.testing.assert_close(sum(p.loss_sum for p in parts), full.loss_sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(sum(p.weight_sum for p in parts), full.weight_sum)


def test_factory_save_load_and_generate(tmp_path):
    plain = build_causal_lm(tiny("none"))
    assert type(plain) is HyenaGLTForCausalLM
    m = build_causal_lm(tiny("entropy", seed=3))
    assert isinstance(m, BLTForCausalLM)
    a, _ = perturbed_pair(L=40)
    m.calibrate_patcher(a)
    m.save_pretrained(tmp_path / "blt")
    loaded = load_causal_lm(tmp_path / "blt").eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(a).logits, loaded(a).logits)
    assert torch.equal(loaded.model.patcher.threshold, m.model.patcher.threshold)
    out = loaded.generate(a[:1, :5], 4, temperature=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9) and (out[:, 5:] >= 4).all()


def test_init_is_deterministic_and_name_seeded():
    a, b = build_causal_lm(tiny("learned")), build_causal_lm(tiny("learned"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    for p in a.parameters():
        assert hasattr(p, "init_fn") and hasattr(p, "no_weight_decay")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(patching="dynamic"), "patching"),
        (dict(patching="static", patch_size=2.5), "patch_size"),
        (dict(patching="entropy", min_patch=4, max_patch=2, patch_size=3), "min_patch"),
        (dict(patching="entropy", patch_size=20, max_patch=16), "patch_size"),
        (dict(patching="learned", patch_budget=0.01), "patch_budget"),
        (dict(local_encoder_pattern="SX"), "local_encoder_pattern"),
        (dict(entropy_mode="quantile"), "entropy_mode"),
        (dict(merge_relaxation="gumbel"), "merge_relaxation"),
        (dict(position_periods=[1]), "position_periods"),
    ],
)
def test_invalid_patching_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HyenaGLTConfig(**{**dict(d_model=64, num_heads=4, num_filter_groups=8), **kwargs})


def test_entropy_threshold_adapts_to_the_target_rate():
    from hyena_glt.blt.patchers import next_byte_entropy

    m = build_causal_lm(tiny("entropy", entropy_adapt=True, min_patch=1, max_patch=16)).train()
    a, _ = perturbed_pair(L=200)
    with torch.no_grad():
        ent = next_byte_entropy(m.model.patcher.lm(a))[:, 2:]
        m.model.patcher.threshold.fill_(torch.quantile(ent, 0.25).item())  # 3 boundaries in 4: far off
    assert m(a).patch_info.boundaries[:, 2:].float().mean().item() > 0.6
    for _ in range(60):
        m(a)  # forward only: the EMA moves the threshold toward the target quantile
    rate = m(a).patch_info.boundaries[:, 2:].float().mean().item()
    assert 0.18 < rate < 0.32  # target 1 / 4
    m.eval()
    before = m.model.patcher.threshold.clone()
    m(a)
    assert torch.equal(before, m.model.patcher.threshold)  # never in eval


def test_parallel_layout_check_takes_every_layout_with_merging():
    from megatron_adapters.parallel_config import ParallelConfig, ParallelConfigError, check_layout

    check_layout(ParallelConfig(tp=2, cp=2, pp=2), tiny("none"))
    for patching in ("static", "learned", "entropy"):  # megatron_adapters/merging.py
        check_layout(ParallelConfig(tp=2, cp=2, pp=2, sp=True), tiny(patching))
    with pytest.raises(ParallelConfigError, match="entropy patcher's byte LM d_model"):
        check_layout(ParallelConfig(tp=4), tiny("entropy").model_copy(update={"entropy_d_model": 18}))


@pytest.mark.parametrize("patching", ["static", "learned"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(patching):
    cfg = tiny(patching, local_encoder_pattern="SD", local_decoder_pattern="S*")
    ids = torch.randint(4, 260, (2, 96), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        m = BLTForCausalLM(cfg)
        m.model.activation_checkpointing = recompute
        out = m(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-9, msg=n)
