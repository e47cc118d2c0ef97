"""Running a trained model: sampling, and forwards over sequences of any length.

* `generate`: prefill each prompt once, then one cached step per new token (O(1) per token
  for Hyena layers, a K/V read for attention). Prompts of different lengths share one batch;
  each row samples from its own random stream, `sample_seed(seed, prompt, k)`: a function of
  the seed, the prompt's ids and k (the row's rank among the rows with the same prompt), so
  the samples of one prompt are independent draws, different prompts do not share draws, and
  a sample is the same alone, in a batch, or among more samples. Families without a cache
  (token merging) recompute the prefix each step.
* `stream_logprobs` / `stream_hidden`: the forward over a sequence in chunks, carrying the
  cache, so memory is bounded by the chunk (plus attention's K/V cache, which grows with
  length; made once at the sequence's length, optionally in bfloat16). Equal to the one-pass
  forward up to float rounding; attention over the cached prefix runs unmasked through the
  fused kernels (hyena_glt.operators.prefix_causal_attention), so chunks cost what one pass
  costs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .tokenizer import EOS_ID, NUM_SPECIAL, PAD_ID

if TYPE_CHECKING:  # the model calls into this module; it never needs the class at run time
    from .model import CausalLM


def _mask_logits(logits: torch.Tensor, allow_eos: bool) -> torch.Tensor:
    logits = logits.float().clone()
    eos = logits[:, EOS_ID].clone()
    logits[:, :NUM_SPECIAL] = float("-inf")  # sample bytes only
    logits[:, NUM_SPECIAL + 256 :] = float("-inf")  # padded vocab rows are never real tokens
    if allow_eos:
        logits[:, EOS_ID] = eos
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generators: list[torch.Generator | None] | None = None, allow_eos: bool = False) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V): greedy for temperature <= 0, else
    temperature, then top-k, then top-p (the smallest set of tokens whose probability
    reaches top_p; the most likely token always stays)."""
    logits = _mask_logits(logits, allow_eos)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the set reached top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    gens = generators or [None] * probs.shape[0]
    return torch.cat([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(probs.shape[0])])


def sample_seed(seed: int, prompt, k: int = 0) -> int:
    """The seed of sample `k` (0-based) of `prompt` (a sequence of token ids) under `seed`: a
    64-bit hash of all three (BLAKE2b), so every (seed, prompt, k) has its own random stream,
    one that does not depend on the other rows of a batch or on how many samples are drawn."""
    ids = torch.as_tensor(prompt).reshape(-1).tolist()
    key = f"hyena-glt sample v1|{int(seed)}|{int(k)}|{','.join(map(str, ids))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # < 2**63


def sample_seeds(seed: int, prompts) -> list[int]:
    """`sample_seed` for each row of a batch: k counts the earlier rows with the same ids, so
    n copies of one prompt are samples 0..n-1 of it (n independent draws)."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for p in prompts:
        key = tuple(torch.as_tensor(p).reshape(-1).tolist())
        k = seen[key] = seen.get(key, -1) + 1
        out.append(sample_seed(seed, key, k))
    return out


@torch.no_grad()
def generate(model: CausalLM, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, generator: torch.Generator | None = None,
             stop_at_eos: bool = False, seq_type: torch.Tensor | None = None, use_cache: bool | None = None,
             progress: bool = False, seeds: list[int] | None = None):
    """Continuations of `prompts`: a (B, L) id tensor (returns a (B, L + N) tensor, PAD after a
    row's EOS) or a list of 1-D id tensors of any lengths (returns a list). `seed` gives every
    row its own generator, seeded with `sample_seeds(seed, prompts)` (copies of one prompt are
    independent samples; a row's tokens do not depend on the other rows); `seeds` seeds row b's
    generator with seeds[b] as given; `generator` is one generator shared by all rows instead.
    `use_cache`: None = whenever the model family has a cache."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    as_tensor = torch.is_tensor(prompts)
    rows = [p.reshape(-1) for p in (prompts.unbind(0) if as_tensor else prompts)]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompts: need at least one prompt, each with at least one id (e.g. BOS)")
    B = len(rows)
    if sum(x is not None for x in (seed, seeds, generator)) > 1:
        raise ValueError("generate: give at most one of seed, seeds and generator")
    if seed is not None:
        seeds = sample_seeds(seed, rows)
    if seeds is not None:
        if len(seeds) != B:
            raise ValueError(f"seeds: one per prompt, got {len(seeds)} for {B} prompts")
        generators = [torch.Generator(device=rows[0].device).manual_seed(int(s)) for s in seeds]
    else:
        generators = [generator] * B
    use_cache = model.supports_cache if use_cache is None else use_cache
    if use_cache and not model.supports_cache:
        raise ValueError(f"{type(model).__name__} has no inference cache; generate with use_cache=False")
    out = [r.tolist() for r in rows]
    done = [False] * B
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, unit="tok", desc="generate", leave=False)

    def take(next_ids: torch.Tensor) -> None:
        for b, t in enumerate(next_ids.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = stop_at_eos and t == EOS_ID

    st = seq_type if seq_type is None else seq_type.reshape(-1)
    if use_cache:
        same_length = len({r.numel() for r in rows}) == 1
        if same_length:
            logits, cache = model.prefill(torch.stack(rows), seq_type=st)
            logits = logits[:, -1]
        else:  # prefill each prompt alone (no padding enters a Hyena state), then one batch
            from .cache import InferenceCache

            parts = [model.prefill(r[None], seq_type=None if st is None else st[b : b + 1]) for b, r in enumerate(rows)]
            logits = torch.cat([lg[:, -1] for lg, _ in parts])
            cache = InferenceCache.stack([c for _, c in parts])
        for n in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generators, stop_at_eos)
            take(nxt)
            if bar is not None:
                bar.update(1)
            if all(done) or n == max_new_tokens - 1:
                break
            logits = model.step(nxt, cache)
    else:
        for n in range(max_new_tokens):
            nxt = []
            for b in range(B):  # one row at a time: rows of different lengths need no padding
                if done[b]:
                    nxt.append(torch.tensor([PAD_ID], device=rows[b].device))
                    continue
                ids = torch.tensor([out[b]], device=rows[b].device)
                lg = model(ids, seq_type=None if st is None else st[b : b + 1]).logits[:, -1]
                nxt.append(sample_next(lg, temperature, top_k, top_p, generators[b : b + 1], stop_at_eos))
            take(torch.cat(nxt))
            if bar is not None:
                bar.update(1)
            if all(done):
                break
    if bar is not None:
        bar.close()
    if not as_tensor:
        return [torch.tensor(o, dtype=rows[0].dtype) for o in out]
    width = max(len(o) for o in out)
    return torch.tensor([o + [PAD_ID] * (width - len(o)) for o in out], dtype=rows[0].dtype, device=rows[0].device)


def _chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """[start, end) of each chunk of n positions: the whole when chunk_size is None (or 0)."""
    step = n if not chunk_size else chunk_size
    for s in range(0, n, max(step, 1)):
        yield s, min(s + step, n)


def _stream_cache(config, batch_size: int, seq_type, device, kv_dtype, capacity: int):
    """The cache of a stream of `capacity` positions: K/V made up front at that size (no
    regrowth, no doubled capacity), in `kv_dtype` (None: the model's own dtype)."""
    from .cache import InferenceCache

    return InferenceCache.empty(batch_size, seq_type, device=device, config=config, kv_dtype=kv_dtype,
                                capacity=capacity)


@torch.no_grad()
def stream_logprobs(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
                    seq_type: torch.Tensor | None = None, kv_dtype: torch.dtype | None = None,
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """log p(labels[b, i] | input_ids[b, :i+1]) (B, L), computed `chunk_size` positions at a
    time with the inference cache (one pass when None or >= L, or for a family without a
    cache). `kv_dtype`: the dtype attention's K/V cache is stored in (None: the model's; e.g.
    torch.bfloat16 halves it, see docs/inference.md for its cost). `progress(start, end)` is
    called after each chunk with the positions [start, end) of `input_ids` just done.

    `input_ids` start with BOS ([BOS] + seq[:-1] -> seq). A model without BOS
    (`config.bos_token` False, e.g. an imported Evo 2) reads seq[:-1] -> seq[1:]: the first
    base has nothing to be predicted from, and its entry is 0 (give it weight 0)."""
    if not model.config.bos_token:
        out = torch.zeros(labels.shape, dtype=torch.promote_types(model.output_weight.dtype, torch.float32))
        if labels.shape[1] > 1:
            shifted = None if progress is None else (lambda s, e: progress(s + 1, e + 1))
            out[:, 1:] = _stream_logprobs(model, input_ids[:, 1:], labels[:, 1:], chunk_size, seq_type, kv_dtype,
                                          shifted)
        return out
    return _stream_logprobs(model, input_ids, labels, chunk_size, seq_type, kv_dtype, progress)


def _stream_logprobs(model, input_ids, labels, chunk_size, seq_type, kv_dtype=None, progress=None):
    B, L = input_ids.shape
    if not model.supports_cache or chunk_size is None or chunk_size >= L:
        logits = model(input_ids, seq_type=seq_type).logits
        out = _gather_logprobs(logits, labels)
        if progress is not None:
            progress(0, L)
        return out
    cache = _stream_cache(model.config, B, seq_type, model.output_weight.device, kv_dtype, L)
    out = torch.empty(labels.shape, dtype=torch.promote_types(model.output_weight.dtype, torch.float32))
    for s, e in _chunks(L, chunk_size):
        out[:, s:e] = _gather_logprobs(model.extend(input_ids[:, s:e], cache), labels[:, s:e]).cpu()
        if progress is not None:
            progress(s, e)
    return out


def _gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.gather(-1, labels.clamp_min(0)[..., None].to(logits.device)).squeeze(-1).cpu()


@torch.no_grad()
def stream_hidden(backbone, input_ids: torch.Tensor, chunk_size: int | None = None, layer: int | None = None,
                  seq_type: torch.Tensor | None = None, kv_dtype: torch.dtype | None = None,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Hidden states (B, L, D): after the final norm, or the output of block `layer` (0-based;
    negative counts from the end) with `layer` given, `chunk_size` positions at a time when
    the backbone has an inference cache (`extend`). `kv_dtype` and `progress` as for
    `stream_logprobs`."""
    n_layers = len(backbone.layers)
    upto = None
    if layer is not None:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"--layer: the model has {n_layers} blocks (0..{n_layers - 1}), got {layer}")
        upto = layer % n_layers + 1
    B, L = input_ids.shape
    if not hasattr(backbone, "extend"):
        if chunk_size is not None or upto is not None:
            raise ValueError(f"{type(backbone).__name__} (token merging) runs in one pass: drop --chunk-size/--layer")
        out = backbone(input_ids, seq_type=seq_type)
        if progress is not None:
            progress(0, L)
        return out
    chunked = bool(chunk_size) and chunk_size < L
    cache = _stream_cache(backbone.config, B, seq_type, input_ids.device, kv_dtype, L if chunked else 0)
    parts = []
    for s, e in _chunks(L, chunk_size):
        parts.append(backbone.extend(input_ids[:, s:e], cache, upto=upto).cpu())
        if progress is not None:
            progress(s, e)
    return torch.cat(parts, dim=1)
