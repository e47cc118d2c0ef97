"""The architecture options that make an Evo 2 model expressible (each off by default).

Their parallel forms are checked in tests/parallel/test_parallel_layouts.py (the *-evo2 layouts), their
numbers against Vortex itself in tests/interop/test_evo2.py; here each option does what it says on one
device, and the inference cache follows it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyena_glt import HyenaGLTConfig, build_causal_lm
from hyena_glt.layers import RMSNorm
from hyena_glt.operators import rope

EVO2 = dict(norm_eps_placement="outside", mixer_out_bias=True, mlp_activation="identity", first_mlp_activation="gelu",
            medium_decay=False, short_filter_skip=False, mlp_hidden_size=80, rope_position_scale=8.0, vocab_size=512)


def cfg(**kw) -> HyenaGLTConfig:
    return HyenaGLTConfig(**{**dict(pattern="SDH*SDH*", d_model=32, num_heads=4, num_filter_groups=4,
                                    medium_filter_len=16, modal_order=4, max_seq_len=128, seed=1), **kw})


def test_defaults_are_this_projects_behaviour():
    c = cfg()
    assert (c.norm_eps_placement, c.mixer_out_bias, c.first_mlp_activation, c.medium_decay, c.short_filter_skip,
            c.mlp_hidden_size, c.rope_position_scale) == ("inside", False, None, True, True, None, 1.0)


def test_norm_eps_placement():
    x = torch.randn(3, 8, dtype=torch.float64) * 1e-3
    inside, outside = RMSNorm(8, 1e-4, "inside").double(), RMSNorm(8, 1e-4, "outside").double()
    with torch.no_grad():
        inside.weight.fill_(1.0), outside.weight.fill_(1.0)
    ms = x.pow(2).mean(-1, keepdim=True)
    assert torch.allclose(inside(x), x / (ms + 1e-4).sqrt())
    assert torch.allclose(outside(x), x / (ms.sqrt() + 1e-4))
    assert not torch.allclose(inside(x), outside(x))
    with pytest.raises(ValueError, match="norm_eps_placement"):
        cfg(norm_eps_placement="middle")


def test_each_option_changes_the_model_as_stated():
    base, evo = build_causal_lm(cfg()), build_causal_lm(cfg(**EVO2))
    names = dict(evo.named_parameters())
    assert "model.layers.0.mixer.out_proj.bias" in names and "model.layers.3.mixer.out_proj.bias" in names
    assert "model.layers.0.mixer.filter.skip" not in names and "model.layers.0.mixer.filter.skip" in dict(base.named_parameters())
    assert evo.model.embed.weight.shape == (512, 32) and evo.model.layers[0].mlp.gate_proj.weight.shape == (80, 32)
    assert evo.model.layers[0].mlp.act is F.gelu and evo.model.layers[1].mlp.act(torch.tensor(-2.0)) == -2.0
    d = evo.model.layers[1].mixer.filter  # raw taps, repeated per group: no decay
    assert torch.equal(d.filter(), d.weight.repeat_interleave(d.group_size, 0))
    assert not torch.equal(base.model.layers[1].mixer.filter.filter(),
                           base.model.layers[1].mixer.filter.weight.repeat_interleave(8, 0))
    x = torch.randn(1, 2, 5, 8)
    pos = torch.arange(5)[None] * 8
    assert torch.allclose(rope(x, pos, 1e4, 8.0), rope(x, torch.arange(5)[None], 1e4))
    ids = torch.randint(4, 260, (2, 40))
    out = evo(ids, labels=ids)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and all(p.grad is not None for p in evo.parameters())


def test_inference_cache_follows_every_option():
    m = build_causal_lm(cfg(**EVO2)).eval()
    ids = torch.randint(4, 260, (2, 60))
    with torch.no_grad():
        full = m(ids).logits
        logits, cache = m.prefill(ids[:, :20])
        steps = torch.cat([logits] + [m.step(ids[:, t], cache)[:, None] for t in range(20, 60)], 1)
    assert (steps - full).abs().max() <= 1e-5 * full.abs().max()
