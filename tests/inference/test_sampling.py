"""Sampling draws: every sample has its own random stream derived from the seed.

`generate --num-samples N` once gave N identical sequences (every row's generator was seeded
with the same --seed), and different prompts drew the same random numbers (so converged on
similar continuations). Now row b draws from sample_seed(seed, prompt b, k), k its rank among
the rows with the same prompt.
"""

from __future__ import annotations

import pytest
import torch

from hyena_glt import HyenaGLTConfig, build_causal_lm
from hyena_glt.inference import generate, sample_seed, sample_seeds
from launch.cli import main

# A random model: its next-byte distributions are far from one-hot, so independent draws differ.
SMALL = dict(pattern="SH*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16, modal_order=4,
             max_seq_len=256, seed=7)
KW = dict(temperature=1.0, top_k=None, top_p=None)
N_NEW = 40


@pytest.fixture(scope="module")
def model():
    return build_causal_lm(HyenaGLTConfig(**SMALL)).eval()


def ids(text: str) -> torch.Tensor:
    return torch.tensor([1] + [b + 4 for b in text.encode()])


def new_tokens(out: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[list[int]]:
    return [o[len(p):].tolist() for o, p in zip(out, prompts)]


def test_samples_of_one_prompt_are_independent_draws(model):
    p = ids("ACGTACGGTA")
    out = new_tokens(generate(model, [p] * 4, N_NEW, seed=0, **KW), [p] * 4)
    assert len({tuple(o) for o in out}) == 4  # four different samples
    # Independent: no two samples agree on much more than chance (1/4 per byte for DNA-like bytes).
    for i in range(4):
        for j in range(i + 1, 4):
            assert sum(a == b for a, b in zip(out[i], out[j])) < N_NEW // 2


def test_same_seed_same_output_other_seed_other_output(model):
    prompts = [ids("ACGT"), ids("GGATTACA"), ids("ACGT")]
    a = generate(model, prompts, N_NEW, seed=5, **KW)
    b = generate(model, prompts, N_NEW, seed=5, **KW)
    c = generate(model, prompts, N_NEW, seed=6, **KW)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, z) for x, z in zip(a, c))


def test_different_prompts_draw_different_random_numbers(model):
    """Two prompts that end in the same context would, with shared draws, give the same tokens."""
    p, q = ids("TTTTACGTACGT"), ids("GGGGACGTACGT")
    assert sample_seed(0, p, 0) != sample_seed(0, q, 0)
    g = [torch.Generator().manual_seed(sample_seed(0, x, 0)) for x in (p, q)]
    assert not torch.equal(torch.rand(16, generator=g[0]), torch.rand(16, generator=g[1]))


def test_a_sample_does_not_depend_on_the_number_of_samples_or_the_batch(model):
    p, q = ids("ACGTTGCA"), ids("GATTACAGATTACA")
    three = generate(model, [p, p, p], N_NEW, seed=3, **KW)
    two = generate(model, [p, p], N_NEW, seed=3, **KW)
    mixed = generate(model, [q, p, q, p], N_NEW, seed=3, **KW)  # p's samples 0 and 1, among q's
    alone_q = generate(model, [q], N_NEW, seed=3, **KW)
    assert torch.equal(three[0], two[0]) and torch.equal(three[1], two[1])
    assert torch.equal(mixed[1], two[0]) and torch.equal(mixed[3], two[1])
    assert torch.equal(mixed[0], alone_q[0])
    # A (B, L) tensor batch of copies: the same draws as the list form.
    t = generate(model, torch.stack([p, p]), N_NEW, seed=3, **KW)
    assert torch.equal(t[0], two[0]) and torch.equal(t[1], two[1])


def test_sample_seeds_and_explicit_seeds():
    p, q = ids("AC"), ids("GT")
    assert sample_seeds(9, [p, q, p]) == [sample_seed(9, p, 0), sample_seed(9, q, 0), sample_seed(9, p, 1)]
    assert all(0 <= s < 2**63 for s in sample_seeds(9, [p, q, p]))
    assert sample_seed(9, p.tolist(), 1) == sample_seed(9, p, 1)  # ids as a list or a tensor


def test_explicit_seeds_and_argument_checks(model):
    p = ids("ACGT")
    s = sample_seeds(4, [p, p])
    assert all(torch.equal(a, b) for a, b in zip(generate(model, [p, p], 10, seeds=s, **KW),
                                                  generate(model, [p, p], 10, seed=4, **KW)))
    with pytest.raises(ValueError, match="at most one of seed, seeds and generator"):
        generate(model, [p], 5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, [p, p], 5, seeds=[1])


def test_cli_num_samples_differ_and_reruns_are_identical(model, tmp_path, capsys):
    d = tmp_path / "m"
    model.save_pretrained(d)

    def cli(seed: int, n: int, *prompts: str) -> dict[str, str]:
        out = tmp_path / f"s{seed}_{n}.fa"
        args = ["generate", "--model", str(d), "--num-samples", str(n), "--max-new-tokens", str(N_NEW),
                "--seed", str(seed), "--top-k", "0", "--out", str(out)]
        for p in prompts:
            args += ["--prompt", p]
        assert main(args) == 0
        capsys.readouterr()
        recs, name = {}, None
        for line in out.read_text().splitlines():
            if line.startswith(">"):
                name = line[1:].split()[0]
                recs[name] = ""
            else:
                recs[name] += line
        return recs

    first = cli(0, 3, "ACGTACGT", "TTGACA")
    assert len(first) == 6 and len(set(first.values())) == 6  # 3 different samples per prompt
    assert cli(0, 3, "ACGTACGT", "TTGACA") == first  # same seed: same output
    other = cli(1, 3, "ACGTACGT", "TTGACA")
    assert all(other[k] != first[k] for k in first)  # another seed: other samples
    # Sample K of a prompt is the same with fewer samples and without the other prompt.
    fewer = cli(0, 2, "TTGACA")
    assert fewer["prompt1_sample1"] == first["prompt2_sample1"] and fewer["prompt1_sample2"] == first["prompt2_sample2"]
