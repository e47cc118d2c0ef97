"""Streaming with attention: a chunk after a cached prefix attends to the prefix without a
mask and to itself causally, the two combined by their log-sum-exp (operators.
prefix_causal_attention). Chunked `score`/`embed` and `stream_logprobs`/`stream_hidden`
equal one pass; a bfloat16 K/V cache stays close; progress is counted in bases per chunk.

Tolerances: fp32 |a - b| <= 1e-5 * max|b| per tensor (as tests/inference/test_inference.py);
bf16 K/V cache: per-base log-probs within 2e-3 nats of one pass (measured 6e-5 here) and
hidden states within 1e-2 * max|b|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli

from hyena_glt import HyenaGLTConfig, build_causal_lm
from hyena_glt import operators as ops
from hyena_glt.cache import InferenceCache
from hyena_glt.inference import stream_hidden, stream_logprobs
from launch.inference.evaluate import auto_chunk_size

RTOL = 1e-5
BF16_LOGP_ATOL = 2e-3
LENGTH = 203  # no chunk size below divides it evenly but 1 and 7
CHUNKS = [1, 7, 16, 50, 64, 202]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


@pytest.fixture(scope="module")
def model():
    cfg = HyenaGLTConfig(pattern="S*H*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16,
                         modal_order=8, max_seq_len=256, seed=3)
    return build_causal_lm(cfg).eval()


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (2, LENGTH), generator=g)
    return ids, torch.roll(ids, -1, 1)


def _reference_attention(q, k, v, k_prefix, v_prefix):
    """softmax over the prefix and the chunk's keys up to each query, written out."""
    keys, values = torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2)
    T, n = q.shape[2], k_prefix.shape[2]
    scores = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    hidden = torch.arange(n + T)[None, :] > (n + torch.arange(T))[:, None]
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ values


@pytest.mark.parametrize("T,n", [(1, 9), (5, 1), (33, 70), (64, 3000)])
def test_prefix_then_causal_chunk_equals_one_softmax(T, n):
    g = torch.Generator().manual_seed(T + n)
    q, k, v = torch.randn(3, 2, 3, T, 16, generator=g).unbind(0)
    kp, vp = torch.randn(2, 2, 3, n, 16, generator=g).unbind(0)
    ref = _reference_attention(q, k, v, kp, vp)
    assert close(ops.prefix_causal_attention(q, k, v, kp, vp), ref)
    # the plain-matmul fallback (devices without a fused kernel) gives the same output and log-sum-exp
    for causal, keys, values in ((True, k, v), (False, kp, vp)):
        out, lse = ops.attention_with_lse(q, keys, values, causal)
        out_m, lse_m = ops.math_attention_with_lse(q, keys, values, causal, scores_per_block=T * 2 * 3 * 256)
        assert close(out_m, out) and close(lse_m, lse)
    # a bf16 prefix is read block by block, each block cast back to fp32
    kb, vb = kp.bfloat16(), vp.bfloat16()
    ref_b = _reference_attention(q, k, v, kb.float(), vb.float())
    old = ops.PREFIX_BLOCK_BYTES
    ops.PREFIX_BLOCK_BYTES = 1  # the smallest block (1024 keys): several blocks at n = 3000
    try:
        assert close(ops.prefix_causal_attention(q, k, v, kb, vb), ref_b)
    finally:
        ops.PREFIX_BLOCK_BYTES = old


def test_streaming_takes_the_unmasked_path(model, seqs, monkeypatch):
    """A stream never builds a (chunk x cache) mask: the masked path is for left-padded batches."""
    ids, labels = seqs
    one = stream_logprobs(model, ids, labels, None)

    def masked(*a, **k):
        raise AssertionError("blocked_attention used while streaming")

    monkeypatch.setattr(ops, "blocked_attention", masked)
    assert close(stream_logprobs(model, ids, labels, 50), one)
    with torch.no_grad():  # decoding steps after a prefill too
        full = model(ids[:, :60]).logits
        logits, cache = model.prefill(ids[:, :50])
        steps = torch.cat([logits] + [model.step(ids[:, t], cache)[:, None] for t in range(50, 60)], 1)
    assert close(steps, full)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_stream_logprobs_and_hidden_equal_one_pass(model, seqs, chunk):
    ids, labels = seqs
    one = stream_logprobs(model, ids, labels, None)
    seen = []
    got = stream_logprobs(model, ids, labels, chunk, progress=lambda s, e: seen.append((s, e)))
    assert close(got, one)
    # progress: every chunk reported once, in order, covering every position
    assert seen == [(s, min(s + chunk, LENGTH)) for s in range(0, LENGTH, chunk)]
    ref = model.model(ids)
    assert close(stream_hidden(model.model, ids, chunk), ref)
    if chunk in (1, 50):
        assert close(stream_hidden(model.model, ids, None, layer=1), stream_hidden(model.model, ids, chunk, layer=1))


def test_bf16_kv_cache_within_tolerance(model, seqs):
    ids, labels = seqs
    one = stream_logprobs(model, ids, labels, None)
    for chunk in (1, 64):
        got = stream_logprobs(model, ids, labels, chunk, kv_dtype=torch.bfloat16)
        assert (got - one).abs().max() <= BF16_LOGP_ATOL
    assert close(stream_hidden(model.model, ids, 64, kv_dtype=torch.bfloat16), model.model(ids), 1e-2)
    # the cache holds bf16 K/V, made once at the stream's length (never regrown)
    cache = InferenceCache.empty(2, config=model.config, kv_dtype=torch.bfloat16, capacity=LENGTH)
    with torch.no_grad():
        for s in range(0, LENGTH, 64):
            model.extend(ids[:, s : s + 64], cache)
    kv = [e for e in cache.layers.values() if "k" in e]
    assert len(kv) == 2 and all(e["k"].dtype == torch.bfloat16 and e["k"].shape[2] == LENGTH for e in kv)
    assert all(e["n"] == LENGTH and int(e["pos"].max()) == LENGTH - 1 for e in kv)
    fp32 = InferenceCache.empty(2, config=model.config, capacity=LENGTH)

    def kv_bytes(entries):
        return sum(e[t].numel() * e[t].element_size() for e in entries for t in ("k", "v"))

    assert fp32.layers[1]["k"].dtype == torch.float32 and kv_bytes(kv) * 2 == kv_bytes(fp32.layers.values())


def test_default_chunk_rule():
    tiny = HyenaGLTConfig(pattern="SDH*SDH*", d_model=64, num_heads=4, num_filter_groups=8)
    assert auto_chunk_size(tiny) == 65536  # 1 GiB / (4 x (40 x 64 + 2 x 260)) = 87,154 -> 2^16
    assert auto_chunk_size(tiny, 1, 65536) is None and auto_chunk_size(tiny, 1, 65537) == 65536
    assert auto_chunk_size(tiny, 8) == 8192  # a batch of 8 windows shares the budget
    wide = HyenaGLTConfig(pattern="SH*", d_model=4096, num_heads=32, num_filter_groups=256)
    assert auto_chunk_size(wide, 64) == 1024  # never below 1024


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    model.save_pretrained(d / "m")
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGT"), n)) for n in (LENGTH - 1, 37)]
    (d / "x.fa").write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)))
    return d


def _score(saved, *extra):
    out = saved / f"s{'_'.join(extra)}.tsv"
    pb = saved / f"pb{'_'.join(extra)}"
    rc, _, err = run_cli("score", "--model", saved / "m", "--input", saved / "x.fa", "--out", out, "--per-base", pb,
                         "--progress", "none", *extra)
    assert rc == 0, err
    lls = [float(r.split("\t")[2]) for r in out.read_text().splitlines()[1:]]
    return lls, [np.load(pb / f"{i}.npy") for i in range(2)]


def _embed(saved, *extra):
    out = saved / f"e{'_'.join(extra)}"
    rc, _, err = run_cli("embed", "--model", saved / "m", "--input", saved / "x.fa", "--out", out, "--per-base",
                         "--progress", "none", *extra)
    assert rc == 0, err
    return [np.load(out / f"{i}.npy") for i in range(2)]


@pytest.mark.parametrize("chunk", ["1", "7", "64"])
def test_score_and_embed_commands_chunked_equal_one_pass(saved, chunk):
    """Through the command line: the default (one pass: the records fit the budget) against
    chunks of 1, 7 and 64 positions (none divides the 203 positions of the first record)."""
    lls, per_base = _score(saved)
    c_lls, c_per_base = _score(saved, "--chunk-size", chunk)
    for a, b in zip(c_per_base, per_base):
        assert np.abs(a - b).max() <= RTOL * np.abs(b).max()
    assert np.allclose(c_lls, lls, rtol=1e-6, atol=0)
    emb, c_emb = _embed(saved), _embed(saved, "--chunk-size", chunk)
    for a, b in zip(c_emb, emb):
        assert a.shape == b.shape and np.abs(a - b).max() <= RTOL * np.abs(b).max()
    if chunk == "7":
        b_lls, b_per_base = _score(saved, "--chunk-size", chunk, "--kv-dtype", "bfloat16")
        assert all(np.abs(a - b).max() <= BF16_LOGP_ATOL for a, b in zip(b_per_base, per_base))
        assert all(abs(a - b) <= BF16_LOGP_ATOL * len(pb) for a, b, pb in zip(b_lls, lls, per_base))
        b_emb = _embed(saved, "--chunk-size", chunk, "--kv-dtype", "bfloat16")
        assert all(np.abs(a - b).max() <= 1e-2 * np.abs(b).max() for a, b in zip(b_emb, emb))


def test_progress_counts_bases_chunk_by_chunk(saved, monkeypatch):
    from launch.inference import evaluate

    updates = []
    real_update = evaluate.BaseProgress.update
    monkeypatch.setattr(evaluate.BaseProgress, "update", lambda self, n: (updates.append(n), real_update(self, n)))
    for cmd in ("score", "embed"):
        updates.clear()
        out = saved / f"p_{cmd}"
        rc, _, err = run_cli(cmd, "--model", saved / "m", "--input", saved / "x.fa", "--out", out, "--chunk-size", "64",
                             "--progress", "log")
        assert rc == 0, err
        # the 202-base record moves in chunks of 64 positions (BOS first), then the 37-base one
        assert updates == ([64, 64, 64, 10, 37] if cmd == "score" else [63, 64, 64, 11, 37]), updates
        assert f"{cmd}: 239/239 bp (100%)" in err and "bp/s" in err, err
    rc, out, err = run_cli("eval", "--model", saved / "m", "--data", saved / "x.fa", "--seq-len", "100",
                           "--chunk-size", "30", "--progress", "log")
    assert rc == 0 and '"bases": 239' in out, err
    assert "eval: 239/239 bp (100%)" in err, err



def test_bench_stream_smoke(tmp_path):
    """`hyena-glt bench stream` at its smallest: every row, ratios from its own numbers, chunked
    equal to one pass, and the long stream of both models."""
    import json

    out = tmp_path / "stream.json"
    rc, stdout, err = run_cli("bench", "stream", "--lengths", "600,900", "--chunk-size", "256", "--long", "1500",
                              "--d-model", "32", "--threads", "1", "--json", out)
    assert rc == 0, (stdout + err)[-4000:]
    r = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == r
    runs = ["one pass", "chunked 256", "chunked, bf16 K/V", "Hyena-only one pass"]
    assert [(x["bases"], x["run"]) for x in r["rows"]] == [(L, name) for L in (600, 900) for name in runs]
    for L in (600, 900):
        by = {x["run"]: x for x in r["rows"] if x["bases"] == L}
        for name in runs[:3]:
            x = by[name]
            assert x["seconds"] > 0 and x["cpu_seconds"] > 0 and x["peak_mib"] == x["peak_mib"], x
            assert x["vs_one_pass"] == pytest.approx(x["seconds"] / by["one pass"]["seconds"], rel=1e-12)
        assert by["chunked 256"]["max_abs_dlogp"] <= 1e-5 and by["chunked, bf16 K/V"]["max_abs_dlogp"] <= BF16_LOGP_ATOL
    assert [(x["pattern"], x["bases"]) for x in r["long"]] == [("SDHSDH", 1500), ("SDH*SDH*", 1500)]
    assert r["long"][0]["attention_tflop"] == 0 and r["long"][1]["attention_tflop"] > 0
    assert stdout.startswith("# bench stream: ") and "threads" in stdout.splitlines()[0]
