"""The dual-threshold and optimal (receding-horizon DP) entropy patchers and the
complexity-adaptive merge ratio: exactness of the DP, causality, bounds, calibration, config."""

import itertools

import pytest
import torch
from test_blt_model import assert_causal_bit_exact, assert_causal_with_long_filters_fp64, model_for, perturbed_pair, tiny
from test_blt_segments import sequential_reference

from hyena_glt import HyenaGLTConfig, build_causal_lm, load_causal_lm
from hyena_glt.blt.patchers import (
    adaptive_bounds,
    optimal_boundaries,
    target_patch_length,
    trailing_mean_entropy,
)
from hyena_glt.blt.segments import enforce_patch_lengths

torch.set_num_threads(2)

NEW_MODES = [
    ("dual", {}),
    ("optimal", {}),
    ("optimal", {"patch_lookahead": 0}),
    ("optimal", {"patch_lookahead": 5, "patch_length_weight": 0.5}),
    ("dual", {"patch_adapt": True, "complexity_window": 16}),
    ("optimal", {"patch_adapt": True, "complexity_window": 16}),
    ("entropy", {"entropy_mode": "threshold", "patch_adapt": True}),
]


def patch_cost(b, h, alpha, s, mn, mx, w):
    """The documented objective, written out per patch (inf if a bound is broken)."""
    n = len(b)
    starts = [i for i in range(n) if b[i]] + [n]
    total = 0.0
    for a, e in zip(starts[:-1], starts[1:]):
        length, dev = e - a, (e - a - s[a]) ** 2 / s[a]
        if length > mx or (e < n and length < mn):
            return float("inf")
        total += alpha + w * dev if e < n else w * (dev if length > s[a] else 0.0)
        total += sum(h[a + 1 : e])
    return total


@pytest.mark.parametrize("mn,mx", [(1, 4), (2, 5), (3, 3), (1, 8)])
def test_full_horizon_dp_is_the_global_optimum(mn, mx):
    g = torch.Generator().manual_seed(mn * 10 + mx)
    n = 12
    h = torch.rand(2, n, generator=g, dtype=torch.float64) * 2
    s = torch.rand(2, n, generator=g, dtype=torch.float64) * (mx - mn) + mn
    alpha, w = torch.tensor([0.7, 1.3], dtype=torch.float64), 0.3
    b = optimal_boundaries(h, alpha, s, mn, mx, horizon=n + 1, weight=w)
    for r in range(2):
        args = (h[r].tolist(), float(alpha[r]), s[r].tolist(), mn, mx, w)
        best = min(patch_cost([True, *bits], *args) for bits in itertools.product([False, True], repeat=n - 1))
        assert patch_cost(b[r].tolist(), *args) == pytest.approx(best, abs=1e-12)


def test_without_bounds_or_length_term_the_dp_is_the_threshold_rule():
    h = torch.rand(3, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    for horizon in (1, 3, 8):
        b = optimal_boundaries(h, 1.5, torch.full_like(h, 4.0), 1, 200, horizon, 0.0)
        assert torch.equal(b[:, 1:], h[:, 1:] > 1.5)


@pytest.mark.parametrize("horizon", [1, 2, 4, 7])
def test_dp_decision_sees_only_its_horizon(horizon):
    g = torch.Generator().manual_seed(horizon)
    h = torch.rand(4, 120, generator=g, dtype=torch.float64) * 2
    s = torch.full_like(h, 4.0)
    base = optimal_boundaries(h, 1.0, s, 2, 8, horizon, 0.2)
    changed = 0
    for q in (30, 61, 90):
        h2 = h.clone()
        h2[:, q] = torch.rand(4, generator=g, dtype=torch.float64) * 4
        b2 = optimal_boundaries(h2, 1.0, s, 2, 8, horizon, 0.2)
        first = q - horizon + 1  # the first decision whose window holds entropy[q]
        assert torch.equal(base[:, :first], b2[:, :first])
        changed += int((base != b2).sum())
    assert changed > 0  # the perturbations do move later boundaries


@pytest.mark.parametrize("patching,kw", NEW_MODES)
def test_causality_bit_exact_new_modes(patching, kw):
    m, out = assert_causal_bit_exact(patching, kw)
    assert out.patch_info.lag == (m.config.patch_lookahead if m.config.entropy_mode == "optimal" else 0)


@pytest.mark.parametrize("patching,kw", [NEW_MODES[0], NEW_MODES[3]])
def test_causality_with_long_fft_filters_fp64_new_modes(patching, kw):
    assert_causal_with_long_filters_fp64(patching, kw)


@pytest.mark.parametrize("lookahead", [1, 4])
def test_optimal_prefix_gives_the_same_logits(lookahead):
    """Stronger than the perturbation test: the lagged read makes a prefix's logits those of
    the whole sequence, so the cut-off horizon at the end never reaches a byte's logits."""
    m = model_for("optimal", {"patch_lookahead": lookahead}, pattern="SD", patch_budget=1.0)
    a, _ = perturbed_pair(L=160)
    with torch.no_grad():
        full = m(a).logits
        for cut in (57, 100):
            torch.testing.assert_close(m(a[:, :cut]).logits, full[:, :cut], rtol=0, atol=1e-6)


@pytest.mark.parametrize("patching,kw", NEW_MODES)
def test_new_modes_respect_min_and_max(patching, kw):
    m = model_for(patching, kw, min_patch=2, max_patch=5, patch_size=3)
    a, _ = perturbed_pair(L=300)
    with torch.no_grad():
        info = m(a).patch_info
    for r in range(a.shape[0]):
        lengths = info.lengths[r, : int(info.num_patches[r])]
        assert int(lengths[:-1].min()) >= 2 and int(lengths.max()) <= 5
    assert int(info.lengths.sum()) == a.numel()


def test_dual_is_the_union_of_the_global_and_the_jump_criterion():
    m = build_causal_lm(tiny("dual", min_patch=1, max_patch=16, entropy_threshold=2.0, entropy_jump_threshold=0.5))
    p = m.model.patcher
    h = torch.tensor([[0.0, 1.0, 1.2, 1.9, 2.5, 2.4, 1.0, 1.6, 1.7, 0.2]])
    # global: H > 2 at 4, 5; jump > 0.5 at 3 (+0.7), 7 (+0.6); position 1's jump from H[0] is none
    assert p.candidates(h)[0].nonzero().flatten().tolist() == [3, 4, 5, 7]


def test_complexity_target_is_causal_and_tracks_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.full((1, 100), 0.3), torch.full((1, 100), 1.2)], 1) + 0.01 * torch.rand(1, 200, generator=g)
    s = target_patch_length(h, 0.6, 4.0, 1, 12, window=16)
    assert s[0, 1:100].min() > 7 and s[0, 130:].max() < 2.5  # repeats: long patches; complex: short
    assert s[0, 0] == 4.0 and ((s >= 1) & (s <= 12)).all()
    h2 = h.clone()
    h2[:, 150:] = 5.0
    c, c2 = trailing_mean_entropy(h, 16), trailing_mean_entropy(h2, 16)
    torch.testing.assert_close(c2[:, :150], c[:, :150], rtol=0, atol=0, equal_nan=True)
    assert (c2[:, 150:] > c[:, 150:]).all()


@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_enforce_with_per_byte_bounds_matches_the_sequential_rule(rate):
    g = torch.Generator().manual_seed(3)
    cand = torch.rand(3, 150, generator=g) < rate
    target = torch.rand(3, 150, generator=g) * 6 + 1
    lo, hi = adaptive_bounds(target, 1, 8)
    b = enforce_patch_lengths(cand, lo, hi, longest=8)
    for r in range(3):
        ref, t = [True], 1
        for i in range(1, 150):
            go = (bool(cand[r, i]) and t >= int(lo[r, i])) or t >= int(hi[r, i])
            ref.append(go)
            t = 1 if go else t + 1
        assert b[r].tolist() == ref
    # scalar bounds through the scan path still equal the greedy reference
    assert torch.equal(enforce_patch_lengths(cand, 2, 5), sequential_reference(cand, 2, 5))


def test_calibration_hits_the_target_rate():
    a, _ = perturbed_pair(L=400, batch=4, seed=5)
    for name, kw in [("optimal", {}), ("optimal", {"patch_adapt": True}), ("dual", {})]:
        m = build_causal_lm(tiny(name, min_patch=1, max_patch=12, **kw)).eval()
        m.calibrate_patcher(a)
        with torch.no_grad():
            b = m(a).patch_info.boundaries[:, 2:].float().mean().item()
        assert 0.18 < b < 0.32, (name, kw, b)  # target 1 / 4


def test_optimal_cost_adapts_to_the_target_rate_in_training():
    m = build_causal_lm(tiny("optimal", entropy_adapt=True, min_patch=1, max_patch=12)).train()
    a, _ = perturbed_pair(L=200)
    patcher = m.model.patcher
    solved = patcher.calibrate(a)  # the cost that gives rate 1 / 4 on this batch
    patcher.threshold.fill_(-50.0)  # a boundary at every byte
    assert m(a).patch_info.boundaries[:, 2:].float().mean().item() > 0.9
    for _ in range(7):
        m(a)  # forward only: the EMA moves the cost toward the solved one
    assert abs(float(patcher.threshold) - solved) < 0.5
    m.eval()
    before = patcher.threshold.clone()
    m(a)
    assert torch.equal(before, patcher.threshold)  # never in eval


def test_save_load_keeps_the_new_buffers(tmp_path):
    m = build_causal_lm(tiny("dual", patch_adapt=True, seed=2))
    a, _ = perturbed_pair(L=64)
    m.calibrate_patcher(a)
    m.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m").eval()
    for name in ("threshold", "jump_threshold", "entropy_ref"):
        assert torch.equal(getattr(loaded.model.patcher, name), getattr(m.model.patcher, name)), name
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(a).logits, loaded(a).logits)


BASE = dict(d_model=64, num_heads=4, num_filter_groups=8)


def test_patching_aliases_store_the_long_form():
    for mode in ("dual", "optimal"):
        cfg = HyenaGLTConfig(**BASE, patching=mode)
        assert (cfg.patching, cfg.entropy_mode) == ("entropy", mode)
        assert HyenaGLTConfig.from_dict(cfg.to_dict()) == cfg
    cfg = HyenaGLTConfig(**BASE, patching="static")
    cfg.patching = "optimal"
    assert (cfg.patching, cfg.entropy_mode) == ("entropy", "optimal")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(patching="dual", entropy_mode="topk"), "patching: 'dual' means entropy patching"),
        (dict(patching="static", patch_adapt=True), "patch_adapt: needs entropy patching"),
        (dict(patching="optimal", patch_lookahead=-1), "patch_lookahead"),
        (dict(patching="optimal", patch_length_weight=-0.1), "patch_length_weight"),
        (dict(patching="entropy", complexity_window=1), "complexity_window"),
        (dict(entropy_mode="greedy"), "entropy_mode: must be one of"),
    ],
)
def test_invalid_new_patching_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HyenaGLTConfig(**BASE, **kwargs)
