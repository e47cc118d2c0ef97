import pytest
import torch

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM
from hyena_glt.layers import Block
from hyena_glt.operators import HyenaOperator, split_interleaved
from hyena_glt.params import initialize

torch.set_num_threads(2)


def tiny(pattern="SDH*", **kw) -> HyenaGLTConfig:
    base = dict(pattern=pattern, d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=512, medium_filter_len=32)
    return HyenaGLTConfig(**{**base, **kw})


def perturbed_pair(L=160, j=97, vocab=(4, 260), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(*vocab, (batch, L), generator=g)
    b = a.clone()
    b[:, j] = (a[:, j] - 4 + 1) % 256 + 4
    return a, b


# S, D (32 taps here, <= fftconv.DIRECT_MAX_TAPS) and * never touch an FFT: earlier outputs
# must be bit-identical. H uses the FFT, whose rounding spreads a change at j over
# every output at the 1e-16 (fp64) level, so it is checked in fp64 to 1e-12, while the output
# at and after j must really change.
@pytest.mark.parametrize("code,dtype,tol", [("S", torch.float32, 0), ("D", torch.float32, 0), ("*", torch.float32, 0), ("H", torch.float64, 1e-12)])
def test_block_causality(code, dtype, tol):
    cfg = tiny(code)
    torch.manual_seed(0)
    block = Block(code, cfg, 0)
    initialize(block, 0)
    block = block.to(dtype)
    L, j = 160, 97
    x = torch.randn(2, L, cfg.d_model, dtype=dtype)
    x2 = x.clone()
    x2[:, j] += 1.0
    with torch.no_grad():
        y, y2 = block(x), block(x2)
    diff = (y[:, :j] - y2[:, :j]).abs().max().item()
    assert diff <= tol, f"{code}: output before the change moved by {diff}"
    assert (y[:, j:] - y2[:, j:]).abs().max().item() > 1e-4


def test_medium_filter_fft_path_causal_fp64():
    cfg = tiny("D", medium_filter_len=128)  # 128 taps > DIRECT_MAX_TAPS: FFT path
    model = HyenaGLTForCausalLM(cfg).double()
    a, b = perturbed_pair(L=300, j=250)
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert (la[:, :250] - lb[:, :250]).abs().max() < 1e-12
    assert (la[:, 250:] - lb[:, 250:]).abs().max() > 1e-6


def test_whole_model_causality_exact_without_fft():
    model = HyenaGLTForCausalLM(tiny("SD*S*D", motif_branch=True, seq_type_embedding=True))
    a, b = perturbed_pair()
    st = torch.tensor([0, 1])
    with torch.no_grad():
        la, lb = model(a, seq_type=st).logits, model(b, seq_type=st).logits
    assert torch.equal(la[:, :97], lb[:, :97])
    assert not torch.equal(la[:, 97:], lb[:, 97:])


def test_whole_model_causality_all_operators_fp64():
    model = HyenaGLTForCausalLM(tiny("SDH*SDH*", medium_filter_len=128, conservation=True)).double()
    a, b = perturbed_pair(L=256, j=200)
    cons = torch.rand(2, 256, dtype=torch.float64)
    for blk in model.model.layers:
        torch.nn.init.normal_(blk.conservation_gate)  # make the conservation path non-trivial
    with torch.no_grad():
        la, lb = model(a, conservation=cons).logits, model(b, conservation=cons).logits
    assert (la[:, :200] - lb[:, :200]).abs().max() < 1e-12
    assert (la[:, 200:] - lb[:, 200:]).abs().max() > 1e-6


def test_long_filter_reaches_the_first_positions():
    """The H output at the last position depends on the first position (a real long conv)."""
    cfg = tiny("H")
    op = HyenaOperator("H", cfg, 0.02)
    initialize(op, 0)
    op = op.double()
    x = torch.randn(1, 512, cfg.d_model, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        assert (op(x)[:, -1] - op(x2)[:, -1]).abs().max() > 1e-8


def test_same_seed_same_weights_different_seed_different():
    a, b = HyenaGLTForCausalLM(tiny()), HyenaGLTForCausalLM(tiny())
    torch.manual_seed(123)  # global RNG state must not matter
    c = HyenaGLTForCausalLM(tiny(seed=1))
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, r), n


def test_loss_weights_and_masking():
    model = HyenaGLTForCausalLM(tiny())
    ids = torch.randint(4, 260, (2, 64))
    labels = ids.clone()
    labels[:, :8] = 0  # PAD targets are masked by default
    out = model(ids, labels=labels)
    w = (labels >= 4).float()
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1), reduction="none")
    assert torch.allclose(out.loss, (ce * w.reshape(-1)).sum() / w.sum(), atol=1e-6)
    weights = torch.ones(2, 64)
    weights[:, 10:20] = 0.1  # soft-masked bases
    out2 = model(ids, labels=ids, loss_weights=weights)
    assert torch.allclose(out2.loss, (ce.new_tensor(0) + (torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ids.reshape(-1), reduction="none") * weights.reshape(-1)).sum() / weights.sum()), atol=1e-6)
    assert out2.weight_sum.item() == pytest.approx(weights.sum().item())


def test_no_weight_decay_flags():
    model = HyenaGLTForCausalLM(tiny())
    flagged = {n for n, p in model.named_parameters() if p.no_weight_decay}
    assert all(any(k in n for k in ("filter.", "featurizer", "norm", "skip")) for n in flagged), flagged
    for n, p in model.named_parameters():
        if "filter." in n or "featurizer" in n or "norm" in n:
            assert p.no_weight_decay, n
        if n.endswith("proj.weight") or n == "model.embed.weight":
            assert not p.no_weight_decay, n


def test_interleaved_layout_keeps_groups_whole_in_contiguous_tp_slices():
    cfg = tiny("H", d_model=32, num_filter_groups=8)
    op = HyenaOperator("H", cfg, 0.02)
    initialize(op, 0)
    x = torch.randn(2, 16, cfg.d_model)
    u = op.in_proj(x).transpose(1, 2)
    full = split_interleaved(u, cfg.num_filter_groups)
    for tp in (2, 4, 8):
        rows = 3 * cfg.d_model // tp
        chans = cfg.d_model // tp
        for r in range(tp):
            w_r = op.in_proj.weight[r * rows : (r + 1) * rows]  # a column-parallel rank's rows
            u_r = (x @ w_r.T).transpose(1, 2)
            local = split_interleaved(u_r, cfg.num_filter_groups // tp)
            for k in range(3):  # x1, x2, v of exactly this rank's groups
                assert torch.allclose(local[k], full[k][:, r * chans : (r + 1) * chans], atol=1e-6)


def test_save_load_round_trip(tmp_path):
    cfg = tiny(tie_embeddings=False, motif_branch=True, seq_type_embedding=True)
    model = HyenaGLTForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()
    loaded = HyenaGLTForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    ids = torch.randint(4, 260, (1, 40))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_refuses_mismatched_config(tmp_path):
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="d_model: saved 32, given 64"):
        HyenaGLTForCausalLM.from_pretrained(tmp_path / "m", config=tiny(d_model=64, num_heads=4))
    # weights that do not fit the config: clear error naming the key and shapes
    tiny(pattern="SD").to_json(tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match="config.json: damaged"):  # checksums.json: not the config it saved
        HyenaGLTForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unexpected keys"):
        HyenaGLTForCausalLM.from_pretrained(tmp_path / "m", verify=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HyenaGLTForCausalLM.from_pretrained(tmp_path)


def test_generate_samples_bytes():
    model = HyenaGLTForCausalLM(tiny())
    prompt = torch.tensor([[1, 69, 71, 75, 88]])
    g = torch.Generator().manual_seed(0)
    out = model.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=4, generator=g)
    assert out.shape == (1, 17) and torch.equal(out[:, :5], prompt)
    assert ((out[:, 5:] >= 4) & (out[:, 5:] < 260)).all()
    greedy = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=5, temperature=0))


def test_backward_reaches_every_parameter():
    model = HyenaGLTForCausalLM(tiny("SDH*", motif_branch=True, seq_type_embedding=True, conservation=True))
    ids = torch.randint(4, 260, (2, 64))
    model(ids, labels=ids, seq_type=torch.tensor([0, 2]), conservation=torch.rand(2, 64)).loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
