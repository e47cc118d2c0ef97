"""The inference runtime: cached decoding and streaming forwards equal the one-pass forward.

Tolerance (fp32): |a - b| <= 1e-5 * max|b| per tensor, as the issue states.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hyena_glt import HyenaGLTConfig, build_causal_lm
from hyena_glt.cache import InferenceCache
from hyena_glt.inference import generate, sample_next, stream_hidden, stream_logprobs
from hyena_glt.tokenizer import EOS_ID
from launch.cli import main

RTOL = 1e-5


def every_block(**kw) -> HyenaGLTConfig:
    # medium_filter_len 128 (as released models): chunks shorter than the D filter are tested below.
    settings = dict(pattern="SDH*SDH*", d_model=64, num_heads=4, num_filter_groups=8, medium_filter_len=128,
                    modal_order=16, max_seq_len=512, motif_branch=True, motif_kernel_sizes=[3, 6, 10],
                    seq_type_embedding=True, conservation=True, seed=5)
    return HyenaGLTConfig(**{**settings, **kw})


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= RTOL * b.abs().max())


@pytest.fixture(scope="module")
def model():
    return build_causal_lm(every_block()).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (2, 300), generator=g)
    return ids, torch.tensor([0, 2]), torch.rand(2, 300, generator=g)


def test_prefill_then_steps_equal_the_full_forward_at_every_position(model, batch):
    ids, seq_type, _ = batch
    with torch.no_grad():
        full = model(ids, seq_type=seq_type).logits
        logits, cache = model.prefill(ids[:, :40], seq_type=seq_type)
        steps = [logits] + [model.step(ids[:, t], cache)[:, None] for t in range(40, 300)]
    got = torch.cat(steps, 1)
    assert close(got, full), ((got - full).abs().max() / full.abs().max()).item()
    assert torch.equal(cache.lengths, torch.tensor([300, 300]))
    # The state is O(1) per Hyena layer: only attention's K/V grow with length.
    assert {k for i, d in cache.layers.items() for k in d} == {"feat", "fir", "modal", "k", "v", "pos", "n"}
    assert all(d["modal"].shape == (2, 64, 16) for d in cache.layers.values() if "modal" in d)


@pytest.mark.parametrize("chunk", [1, 7, 100, 128, 299])
def test_streaming_in_chunks_equals_one_pass(model, batch, chunk):
    """Chunks shorter than the 128-tap D filter and the motif kernels, and longer ones."""
    ids, seq_type, cons = batch
    with torch.no_grad():
        full = model(ids, seq_type=seq_type, conservation=cons).logits
        cache = model.new_cache(2, seq_type)
        got = torch.cat([model.extend(ids[:, s:s + chunk], cache, conservation=cons[:, s:s + chunk])
                         for s in range(0, 300, chunk)], 1)
        assert close(got, full)
        labels = torch.roll(ids, -1, 1)
        one = stream_logprobs(model, ids, labels, None, seq_type=seq_type)
        assert close(stream_logprobs(model, ids, labels, chunk, seq_type=seq_type), one)
        for layer in (None, 0, 4, -1):
            ref = stream_hidden(model.model, ids, None, layer, seq_type=seq_type)
            assert close(stream_hidden(model.model, ids, chunk, layer, seq_type=seq_type), ref)
    hidden = model.model(ids, seq_type=seq_type)
    assert close(stream_hidden(model.model, ids, chunk, seq_type=seq_type), hidden)


def test_layer_output_is_that_blocks_output(model, batch):
    ids, seq_type, _ = batch
    seen = {}
    hook = model.model.layers[3].register_forward_hook(lambda m, i, o: seen.__setitem__("y", o))
    with torch.no_grad():
        model.model(ids, seq_type=seq_type)
    hook.remove()
    assert close(stream_hidden(model.model, ids, 64, 3, seq_type=seq_type), seen["y"])
    with pytest.raises(ValueError, match="--layer: the model has 8 blocks"):
        stream_hidden(model.model, ids, 64, 8)


def test_prompts_of_different_lengths_give_the_same_tokens_alone_or_in_a_batch(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 260, (n,), generator=g) for n in (3, 70, 21)]
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    batch = generate(model, prompts, 40, **kw)
    alone = [generate(model, [p], 40, **kw)[0] for p in prompts]
    recompute = generate(model, prompts, 40, use_cache=False, **kw)
    for a, b, c, p in zip(batch, alone, recompute, prompts):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a[: len(p)], p) and len(a) == len(p) + 40


def test_stacked_cache_masks_padded_keys():
    m = build_causal_lm(every_block(conservation=False)).eval()
    rows = [torch.randint(4, 260, (n,)) for n in (2, 9)]
    with torch.no_grad():
        stacked = InferenceCache.stack([m.prefill(r[None])[1] for r in rows])
        alone = [m.prefill(r[None])[1] for r in rows]
        nxt = torch.tensor([50, 60])
        both = m.step(nxt, stacked)
        for b in range(2):
            assert close(both[b], m.step(nxt[b : b + 1], alone[b])[0])


def test_sampling_rules():
    logits = torch.tensor([[0.0] * 4 + [5.0, 4.0, 1.0, 0.5] + [-30.0] * 252])
    assert sample_next(logits, temperature=0).item() == 4
    gens = [torch.Generator().manual_seed(s) for s in range(1)]
    # top-p 0.5: byte 4 alone carries 0.71 of the mass, so it is always drawn.
    draws = {sample_next(logits, 1.0, None, 0.5, [torch.Generator().manual_seed(s)]).item() for s in range(50)}
    assert draws == {4}
    draws = {sample_next(logits, 1.0, 2, None, [torch.Generator().manual_seed(s)]).item() for s in range(200)}
    assert draws == {4, 5}
    # Specials are never drawn unless EOS is allowed; padded vocab rows never.
    eos = torch.cat([logits, torch.zeros(1, 252)], 1)  # a vocabulary padded to 512 rows
    eos[0, EOS_ID] = 50.0
    eos[0, 300] = 80.0
    assert sample_next(eos, temperature=0, generators=gens).item() == 4
    assert sample_next(eos, temperature=0, allow_eos=True).item() == EOS_ID


def test_generation_stops_at_eos():
    m = build_causal_lm(every_block(conservation=False, tie_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()  # every logit 0: greedy picks the lowest allowed id
    prompt = torch.tensor([[1, 40, 41]])
    assert generate(m, prompt, 5, temperature=0).tolist() == [[1, 40, 41, 4, 4, 4, 4, 4]]
    assert generate(m, prompt, 5, temperature=0, stop_at_eos=True).tolist() == [[1, 40, 41, EOS_ID]]
    two = generate(m, [prompt[0], prompt[0, :2]], 3, temperature=0, stop_at_eos=True)
    assert [t.tolist() for t in two] == [[1, 40, 41, EOS_ID], [1, 40, EOS_ID]]


def test_commands_stream_and_match_one_pass(model, tmp_path, capsys):
    d = tmp_path / "m"
    model.save_pretrained(d)
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), n)) for n in (700, 130, 5)]
    fa = tmp_path / "x.fa"
    fa.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)))

    assert main(["eval", "--model", str(d), "--data", str(fa), "--seq-len", "700"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(d), "--data", str(fa), "--seq-len", "700", "--chunk-size", "96"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert abs(one["loss"] - streamed["loss"]) <= RTOL * one["loss"] and one["bases"] == streamed["bases"] == 835

    assert main(["score", "--model", str(d), "--input", str(fa), "--out", str(tmp_path / "s.tsv"), "--chunk-size", "50",
                 "--per-base", str(tmp_path / "pb")]) == 0
    rows = [r.split("\t") for r in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["r0", "r1", "r2"] and [int(r[1]) for r in rows] == [700, 130, 5]
    pb = np.load(tmp_path / "pb" / "0.npy")
    assert pb.shape == (700,) and abs(pb.sum() - float(rows[0][2])) < 1e-3
    # Against the model's own one-pass forward: sum of log p(base i | BOS, bases < i).
    from hyena_glt import ByteTokenizer, detect_seq_type

    ids = ByteTokenizer().encode(seqs[0], add_bos=True).ids[None]
    st = torch.tensor([int(detect_seq_type(seqs[0].encode()))])
    with torch.no_grad():
        logits = model(ids[:, :-1], seq_type=st).logits
        logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:, None]).sum()
    assert abs(float(logp) - float(rows[0][2])) <= 1e-4 * abs(float(logp))

    assert main(["embed", "--model", str(d), "--input", str(fa), "--out", str(tmp_path / "pooled.npy"),
                 "--chunk-size", "64", "--layer", "2"]) == 0
    assert main(["embed", "--model", str(d), "--input", str(fa), "--out", str(tmp_path / "pb_emb"), "--per-base",
                 "--chunk-size", "1000", "--layer", "2"]) == 0
    capsys.readouterr()
    pooled, per_base = np.load(tmp_path / "pooled.npy"), np.load(tmp_path / "pb_emb" / "1.npy")
    assert pooled.shape == (3, 64) and per_base.shape == (130, 64)
    assert np.abs(pooled[1] - per_base.mean(0)).max() <= RTOL * np.abs(per_base).max()

    out = tmp_path / "g.fa"
    assert main(["generate", "--model", str(d), "--prompts", str(fa), "--prompt", "ACG", "--num-samples", "2",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count(">") == 8 and ">r0_sample2 seed=0 new_tokens=12" in text and ">prompt1_sample1" in text
