"""`hyena-glt bench generate`: cached decoding vs recomputing the prefix, and the memory of
a streaming forward vs the one-pass forward.

1. Decoding tokens/s at each prompt length: the cached runtime (prefill once, then one
   `step` per token: O(1) per Hyena layer, a K/V read for attention) against recomputing the
   whole prefix for every token (what generation did without a cache). Prefill time is
   reported apart and not counted in tokens/s.
2. Scoring a long genome stretch: peak resident-memory increase and time of
   `stream_logprobs` in chunks against one forward pass over the whole sequence (only up to
   --one-pass-max bases; beyond that it does not fit).

Every measurement runs in a forked child so its peak memory is its own. The model is random
(weights do not change speed). Sequences are E. coli K-12 bases, read through data_tools.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hyena_glt import HyenaGLTConfig, build_causal_lm
from launch.args import nonnegative_int, positive_int

from .merge import DEFAULT_GENOME, _mmap_large_allocations, read_genome
from .ops import _in_child


def add_arguments(p) -> None:
    p.add_argument("--pattern", default="SDH*SDH*", help="decoding model's layer pattern")
    p.add_argument("--d-model", type=positive_int, default=64, help="width (configs/tiny.yaml: 64)")
    p.add_argument("--lengths", default="1024,8192,65536", help="prompt lengths")
    p.add_argument("--steps", type=positive_int, default=64, help="cached decoding steps timed per prompt length")
    p.add_argument("--recompute-steps", type=positive_int, default=3, help="recomputed tokens timed per prompt length")
    p.add_argument("--stream-pattern", default="SDHSDH",
                   help="scoring model's pattern (default without attention: attention over millions of bases "
                   "costs time quadratic in length, see docs/inference.md)")
    p.add_argument("--stream-lengths", default="1000000,4000000", help="bases scored in one sequence")
    p.add_argument("--chunk-size", type=positive_int, default=16384, help="streaming chunk")
    p.add_argument("--one-pass-max", type=nonnegative_int, default=1000000, help="longest sequence also run in one pass")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--genome", default=str(DEFAULT_GENOME), help="FASTA(.gz) to take bases from (default: bundled E. coli)")


def _config(pattern: str, d_model: int, max_len: int) -> HyenaGLTConfig:
    return HyenaGLTConfig(pattern=pattern, d_model=d_model, num_heads=max(1, d_model // 16), num_filter_groups=8,
                          mlp_ratio=2.0, max_seq_len=max_len, seed=0)


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_job(cfg: HyenaGLTConfig, ids: torch.Tensor, steps: int, recompute_steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build_causal_lm(cfg).eval()
    nxt = torch.full((1,), 40)
    with torch.no_grad():
        t0 = time.perf_counter()
        _, cache = model.prefill(ids)
        prefill = time.perf_counter() - t0
        model.step(nxt, cache)  # warm
        t0 = time.perf_counter()
        for _ in range(steps):
            model.step(nxt, cache)
        cached = steps / (time.perf_counter() - t0)
        seq = ids
        model(seq[:, -64:])  # warm
        t0 = time.perf_counter()
        for _ in range(recompute_steps):
            model(seq).logits[:, -1]
            seq = torch.cat([seq, nxt[None]], 1)
        recompute = recompute_steps / (time.perf_counter() - t0)
    return {"prefill_s": prefill, "cached_tok_s": cached, "recompute_tok_s": recompute,
            "cache_mib": cache.nbytes() / 2**20}


def _stream_job(cfg: HyenaGLTConfig, ids: torch.Tensor, labels: torch.Tensor, chunk: int | None, threads: int) -> dict:
    from hyena_glt.inference import stream_logprobs

    torch.set_num_threads(threads)
    _mmap_large_allocations()
    model = build_causal_lm(cfg).eval()
    base = _rss_mib()
    t0 = time.perf_counter()
    logp = stream_logprobs(model, ids, labels, chunk)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": _rss_mib() - base, "bits_per_base": float(-logp.double().mean() / np.log(2))}


def run(args) -> int:
    import json
    from pathlib import Path

    genome = read_genome(args.genome)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"# bench generate: pattern {args.pattern}, d_model {args.d_model}, batch 1, fp32, {args.threads} threads; "
          "tokens/s after prefill", flush=True)
    print(f"{'prompt':>8}{'prefill s':>11}{'cached tok/s':>14}{'recompute tok/s':>17}{'speedup':>9}{'cache MiB':>11}")
    decode = []
    for L in lengths:
        ids = torch.from_numpy(genome[:L].astype(np.int64) + 4)[None]
        r = _in_child(_decode_job, _config(args.pattern, args.d_model, max(lengths)), ids, args.steps,
                      args.recompute_steps, args.threads)
        r.update(prompt=L, speedup=r["cached_tok_s"] / r["recompute_tok_s"])
        decode.append(r)
        print(f"{L:>8}{r['prefill_s']:>11.2f}{r['cached_tok_s']:>14.1f}{r['recompute_tok_s']:>17.2f}"
              f"{r['speedup']:>8.0f}x{r['cache_mib']:>11.1f}", flush=True)
    if len(decode) > 1:
        print(f"cached tok/s at {decode[-1]['prompt']} vs {decode[0]['prompt']}: "
              f"{decode[-1]['cached_tok_s'] / decode[0]['cached_tok_s']:.2f}x")

    print(f"\n# streaming score: pattern {args.stream_pattern}, d_model {args.d_model}, chunk {args.chunk_size}")
    print(f"{'bases':>10}{'mode':>10}{'seconds':>10}{'peak MiB':>10}{'bits/base':>11}")
    stream = []
    for L in (int(x) for x in args.stream_lengths.split(",")):
        if L > len(genome) - 1:
            raise ValueError(f"--stream-lengths {L}: the genome has {len(genome):,} bases")
        seq = torch.from_numpy(genome[: L + 1].astype(np.int64) + 4)[None]
        ids, labels = seq[:, :-1], seq[:, 1:]
        cfg = _config(args.stream_pattern, args.d_model, 1024)
        for mode, chunk in (("stream", args.chunk_size), ("one pass", None)):
            if chunk is None and L > args.one_pass_max:
                print(f"{L:>10}{mode:>10}{'(does not fit: skipped)':>31}", flush=True)
                continue
            r = _in_child(_stream_job, cfg, ids, labels, chunk, args.threads)
            r.update(bases=L, mode=mode)
            stream.append(r)
            print(f"{L:>10}{mode:>10}{r['seconds']:>10.1f}{r['peak_mib']:>10.0f}{r['bits_per_base']:>11.4f}", flush=True)
    result = {"decode": decode, "stream": stream, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    print(json.dumps(result, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
