"""BLTPositionManager: the seed's API, byte-level shapes and positions, exact vectorized pooling."""

import math

import torch

from hyena_glt import HyenaGLTConfig
from hyena_glt.blt import BLTPositionManager, patch_info
from hyena_glt.blt.position import sinusoid
from hyena_glt.params import initialize

torch.set_num_threads(2)


def manager(**kw):
    cfg = HyenaGLTConfig(**{**dict(pattern="S", d_model=32, num_heads=4, num_filter_groups=4, patching="entropy",
                                   max_patch=8, bridge_window=3), **kw})
    m = BLTPositionManager(cfg)
    initialize(m, 0)
    return m.double()


def boundaries(B=2, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(B, L, generator=g) < 0.3
    b[:, 0] = True
    return b


def test_round_trip_shapes_and_positions():
    m = manager()
    B, L, D = 2, 40, 32
    h = torch.randn(B, L, D, dtype=torch.float64)
    b = boundaries(B, L)
    orig = (1000 + torch.arange(L))[None]
    patches, info = m.create_patch_representations(h, b, num_slots=30, original_positions=orig)
    assert patches.shape == (B, 30, D)
    assert torch.equal(patches[~info.mask], torch.zeros_like(patches[~info.mask]))  # padding slots exactly zero
    starts = [torch.nonzero(b[r]).flatten() for r in range(B)]
    for r in range(B):
        n = len(starts[r])
        assert info.patch_positions[r, :n].tolist() == (1000 + starts[r]).tolist()
    out, positions = m.reconstruct_byte_representations(patches, info, h)
    assert out.shape == (B, L, D)
    assert torch.equal(positions, orig.expand(B, L))


def test_pooling_attention_matches_a_per_patch_loop():
    m = manager()
    B, L, D, H = 2, 40, 32, 4
    h = torch.randn(B, L, D, dtype=torch.float64)
    b = boundaries(B, L, seed=1)
    info = patch_info(b, L)
    query = torch.randn(B, L, D, dtype=torch.float64)
    got = m.pool(h, query, info)
    pool = m.pool
    kd = pool.key_dim
    for r in range(B):
        for k in range(int(info.num_patches[r])):
            sel = info.patch_ids[r] == k
            q = pool.q_proj(query[r, k]).view(H, kd)
            kk = pool.k_proj(h[r, sel]).view(-1, H, kd)
            a = torch.softmax((kk * q).sum(-1) / math.sqrt(kd), dim=0)  # (n, H)
            vv = h[r, sel].view(-1, H, D // H)
            ref = pool.out_proj((a[..., None] * vv).sum(0).reshape(D))
            torch.testing.assert_close(got[r, k], ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[:, int(info.num_patches.max()):], torch.zeros_like(got[:, int(info.num_patches.max()):]))


def test_bytes_attend_only_to_earlier_complete_patches():
    m = manager()
    B, L, D = 1, 30, 32
    h = torch.randn(B, L, D, dtype=torch.float64)
    b = boundaries(B, L, seed=2)
    info = patch_info(b, L)
    g = torch.randn(B, L, D, dtype=torch.float64)
    base = m.unpool(h, g, info)
    # Bytes of patch 0 read nothing; changing patch k moves only bytes of patches k+1..k+window.
    assert torch.equal(base[0, info.patch_ids[0] == 0], torch.zeros_like(base[0, info.patch_ids[0] == 0]))
    k = 2
    g2 = g.clone()
    g2[0, k] += 1
    moved = (m.unpool(h, g2, info) - base).abs().sum(-1)[0] > 0
    expect = (info.patch_ids[0] > k) & (info.patch_ids[0] <= k + 3)
    assert torch.equal(moved, expect)


def test_encode_positions_segment_features_and_periodic_flag():
    m = manager()
    h = torch.zeros(1, 12, 32, dtype=torch.float64)
    plain = m.encode_positions(h)  # no boundaries: every byte its own patch
    seg_row = torch.zeros(32, dtype=torch.float64)
    seg_row[: m.segment.channels] = m.segment.table(torch.float64, "cpu")[m.segment.index(torch.tensor(0), torch.tensor(1))]
    torch.testing.assert_close(plain[0], m.scale * sinusoid(torch.arange(12), 32, torch.float64) + seg_row)
    b = torch.zeros(1, 12, dtype=torch.bool)
    b[0, [0, 5]] = True
    causal = m.encode_positions(h, b)
    # Causal: byte 2's encoding does not depend on where its patch ends.
    b2 = b.clone()
    b2[0, 3] = True
    assert torch.equal(causal[0, :3], m.encode_positions(h, b2)[0, :3])
    full = m.encode_positions(h, b, causal=False)  # bidirectional: full patch length
    assert not torch.equal(full[0, :5], causal[0, :5])
    periodic = manager(position_periods=[3, 10, 147])
    initialize(periodic, 0)
    periodic = periodic.double()
    e = periodic.encode_positions(h) - periodic.scale * sinusoid(torch.arange(12), 32, torch.float64)
    assert not torch.allclose(e[0, 0], e[0, 1])  # the codon phase differs between positions 0 and 1
