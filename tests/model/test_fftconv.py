import pytest
import torch

from hyena_glt.fftconv import (
    BLOCKED_MIN_LEN,
    causal_conv,
    causal_conv_blocked,
    causal_conv_direct,
    causal_conv_fft,
    causal_conv_reference,
    fft_size,
)
from hyena_glt.modal import modal_conv, state_scan
from hyena_glt.filters import DecayedMediumFilter, ModalFilter
from hyena_glt.params import initialize


def direct_loops(z, h):
    """Textbook definition, fp64: y[c, t] = sum_{j<=t} h[c, j] z[c, t-j]."""
    B, C, L = z.shape
    y = torch.zeros_like(z)
    for j in range(min(h.shape[-1], L)):
        y[..., j:] += h[:, j, None] * z[..., : L - j]
    return y


@pytest.mark.parametrize("L,K", [(37, 128), (128, 128), (1000, 128), (3000, 7), (513, 513), (900, 300), (5, 1)])
def test_fft_conv_equals_direct_fp64(L, K):
    g = torch.Generator().manual_seed(L * 7 + K)
    z = torch.randn(2, 6, L, generator=g, dtype=torch.float64)
    h = torch.randn(6, K, generator=g, dtype=torch.float64)
    ref = direct_loops(z, h)
    torch.testing.assert_close(causal_conv_fft(z, h), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(causal_conv_direct(z, h), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(causal_conv(z, h), ref, atol=1e-10, rtol=1e-10)


def test_fft_conv_matches_reference_fp32():
    z = torch.randn(2, 8, 4096)
    h = torch.randn(8, 4096) * 0.02
    torch.testing.assert_close(causal_conv_fft(z, h), causal_conv_reference(z, h), atol=1e-4, rtol=1e-4)


def test_fft_computed_in_fp32_for_bf16_inputs():
    z = torch.randn(1, 4, 2048)
    h = torch.randn(4, 2048) * 0.05
    y16 = causal_conv_fft(z.bfloat16(), h.bfloat16())
    assert y16.dtype == torch.bfloat16
    exact = causal_conv_fft(z.bfloat16().double(), h.bfloat16().double())
    assert (y16.double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_skip_term():
    z = torch.randn(1, 3, 50, dtype=torch.float64)
    h = torch.zeros(3, 200, dtype=torch.float64)
    skip = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(causal_conv(z, h, skip), skip[:, None] * z)


@pytest.mark.parametrize("n", [1, 2, 7, 97, 1000, 4097, 65536 + 127, 131071])
def test_fft_size_is_smooth_and_large_enough(n):
    m = fft_size(n)
    assert m >= n and m <= 2 * n
    r = m
    for p in (2, 3, 5):
        while r % p == 0:
            r //= p
    assert r == 1


def test_modal_filter_any_length_same_parameters():
    f = ModalFilter(8, order=4, max_seq_len=1024)
    initialize(f, 3)
    h_short, h_long = f.filter(100), f.filter(5000)
    assert h_short.shape == (8, 100) and h_long.shape == (8, 5000)
    torch.testing.assert_close(h_long[:, :100], h_short)
    # The parameters never depend on L: the same tensors serve every length.
    assert {n: tuple(p.shape) for n, p in f.named_parameters()} == {"residues": (8, 4), "log_rates": (8, 4), "skip": (8,)}
    # explicit formula
    R, a = f.residues.detach().double(), f.log_rates.detach().double()
    t = torch.arange(100, dtype=torch.float64)
    expect = (R[:, :, None] * torch.exp(-a.exp()[:, :, None] * t)).sum(1)
    torch.testing.assert_close(h_short.double(), expect, atol=1e-5, rtol=1e-5)


def test_modal_filter_gradient_matches_autograd_of_formula():
    f = ModalFilter(4, order=3, max_seq_len=64).double()
    initialize(f, 1)
    f = f.double()
    from hyena_glt.filters import _ModalTaps

    R = f.residues.detach().clone().requires_grad_()
    a = f.log_rates.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda R, a: _ModalTaps.apply(R, a, 40), (R, a))


def test_medium_filter_decays_per_channel_over_global_channels():
    f = DecayedMediumFilter(16, groups=4, taps=32, r_min=0.01, r_max=1.0)
    assert f.rates.shape == (16,)
    assert f.rates[0].item() == pytest.approx(0.01) and f.rates[-1].item() == pytest.approx(1.0)
    assert (f.rates.diff() > 0).all()


# ---- the blocked forms: exact against the definition, values and gradients
@pytest.mark.parametrize("L,K", [(37, 128), (128, 128), (129, 128), (1000, 128), (300, 100), (20, 64)])
def test_blocked_fir_conv_equals_direct_fp64(L, K):
    g = torch.Generator().manual_seed(L + K)
    z = torch.randn(2, 5, L, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, K, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, L, generator=g, dtype=torch.float64)
    y = causal_conv_blocked(z, h)
    torch.testing.assert_close(y, direct_loops(z, h), atol=1e-10, rtol=1e-10)
    got = torch.autograd.grad((y * w).sum(), (z, h))
    want = torch.autograd.grad((direct_loops(z, h) * w).sum(), (z, h))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_long_inputs_take_the_blocked_path_for_medium_filters():
    z = torch.randn(1, 2, BLOCKED_MIN_LEN, dtype=torch.float64)
    h = torch.randn(2, 128, dtype=torch.float64)
    torch.testing.assert_close(causal_conv(z, h), causal_conv_blocked(z, h), atol=0, rtol=0)
    torch.testing.assert_close(causal_conv(z, h), causal_conv_fft(z, h), atol=1e-9, rtol=1e-9)


def _modal(C=6, order=4, max_len=2048, seed=3):
    f = ModalFilter(C, order=order, max_seq_len=max_len)
    initialize(f, seed)
    return f.double()


@pytest.mark.parametrize("L,block", [(1, 64), (5, 64), (64, 64), (65, 64), (1000, 64), (1000, 7), (2048, 128)])
def test_modal_conv_equals_fft_conv_fp64(L, block):
    f = _modal()
    g = torch.Generator().manual_seed(L)
    z = torch.randn(2, 6, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, L, generator=g, dtype=torch.float64)
    y, _ = modal_conv(z, f.residues, f.log_rates, block=block)
    ref = causal_conv_fft(z, f.filter(L))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    params = (z, f.residues, f.log_rates)
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_modal_state_carries_a_split_sequence_exactly():
    """Any cut: the state after the first part continues the convolution exactly (the
    inference cache and context parallelism both rely on it), and equals its definition."""
    f = _modal()
    z = torch.randn(1, 6, 777, dtype=torch.float64)
    whole, s_whole = modal_conv(z, f.residues, f.log_rates)
    for cut in (1, 63, 64, 300):
        a, s = modal_conv(z[..., :cut], f.residues, f.log_rates)
        b, s_end = modal_conv(z[..., cut:], f.residues, f.log_rates, s, block=32)
        torch.testing.assert_close(torch.cat([a, b], -1), whole, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(s_end, s_whole, atol=1e-10, rtol=1e-10)
    rates = f.log_rates.detach().exp()
    j = torch.arange(777, dtype=torch.float64)
    defined = (z[0].flip(-1)[:, None, :] * torch.exp(-rates[..., None] * j)).sum(-1)  # sum_j e^{-rate j} z[-1-j]
    torch.testing.assert_close(s_whole[0], defined, atol=1e-10, rtol=1e-10)


def test_state_scan_gradcheck():
    g = torch.Generator().manual_seed(0)
    local = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    decay = torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(state_scan, (local, decay))
    S, expect, run = state_scan(local, decay), [], torch.zeros(2, 3, 4, dtype=torch.float64)
    for k in range(9):
        run = decay * run + local[:, :, k]
        expect.append(run)
    torch.testing.assert_close(S, torch.stack(expect, 2))
