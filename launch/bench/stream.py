"""`hyena-glt bench stream`: scoring a long sequence in chunks (the inference cache) against
one forward pass, for the tiny attention model, and the 1 Mbp stream of both tiny models.

1. At each of --lengths (default 20K, 64K, 256K bases) with the attention model (`SDH*SDH*`,
   the configs/tiny.yaml shape): `stream_logprobs` in one pass, in --chunk-size chunks with
   the K/V cache in the model's dtype (fp32), and in chunks with a bfloat16 K/V cache: time,
   peak memory, chunked/one-pass time, and the largest difference of a per-base log-prob from
   one pass. The Hyena-only model (`SDHSDH`, the same without its attention blocks) runs in one
   pass beside it: the difference in time is what the attention blocks cost, which gives
   their measured FLOP rate (their FLOPs from the layer-kind registry, `LayerKind.flops`).
2. --long bases (default 1,000,000) streamed by each of --long-patterns (default both tiny
   models) in chunks of the size `hyena-glt score` picks by default (auto_chunk_size), with
   the attention blocks' FLOPs and the time they are expected to take at the rate of step 1.

Time: wall clock of the `stream_logprobs` call, best of --repeats, and the CPU time of the
process over the same call (`time.process_time`, every thread): on a machine shared with other
jobs the wall clock follows their load, the CPU time much less, so ratios are given for both.
Memory: the peak
resident-set increase (ru_maxrss) of a forked child over the model loaded and warmed up,
with allocations >= 1 MiB served by mmap so freed tensors leave the resident set at once:
every tensor the call makes (activations, the K/V cache, the per-base output), not the input.
The models are random (weights do not change speed); bases are E. coli K-12, read through
data_tools. Each measurement runs in its own forked child.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hyena_glt import HyenaGLTConfig, build_causal_lm
from launch.args import nonnegative_float, nonnegative_int, positive_float, positive_int

from .merge import DEFAULT_GENOME, _mmap_large_allocations, read_genome
from .ops import _in_child


def add_arguments(p) -> None:
    p.add_argument("--pattern", default="SDH*SDH*", help="the attention model's layer pattern (configs/tiny.yaml)")
    p.add_argument("--hyena-pattern", default="SDHSDH", help="the Hyena-only model's pattern")
    p.add_argument("--d-model", type=positive_int, default=64, help="width (configs/tiny.yaml: 64)")
    p.add_argument("--lengths", default="20000,65536,262144", help="bases scored chunked and in one pass")
    p.add_argument("--chunk-size", type=positive_int, default=8192, help="chunk of the chunked runs of step 1 (the former "
                   "`score` default)")
    p.add_argument("--long", type=nonnegative_int, default=1_000_000, help="bases of the long stream (0: skip it)")
    p.add_argument("--long-patterns", default=None,
                   help="patterns streamed over --long bases (default: --pattern and --hyena-pattern)")
    p.add_argument("--long-chunk", type=positive_int, default=None,
                   help="chunk of the long stream (default: what `score` picks, auto_chunk_size)")
    p.add_argument("--attention-gflops", type=positive_float, default=None,
                   help="the attention blocks' rate for the long stream's expected time (default: measured at the "
                   "longest of --lengths)")
    p.add_argument("--log-every", type=nonnegative_float, default=600,
                   help="seconds between the long stream's progress lines (0: none)")
    p.add_argument("--no-bf16", action="store_true", help="skip the chunked runs with a bfloat16 K/V cache")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs of each measurement (the best is kept)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--genome", default=str(DEFAULT_GENOME), help="FASTA(.gz) to take bases from (default: bundled E. coli)")


def _config(pattern: str, d_model: int) -> HyenaGLTConfig:
    # configs/tiny.yaml's model (medium filter 128, modal order 16 are the defaults there too)
    return HyenaGLTConfig(pattern=pattern, d_model=d_model, num_heads=max(1, d_model // 16), num_filter_groups=8,
                          max_seq_len=1024, short_filter_len=7, featurizer_len=3, medium_filter_len=128,
                          modal_order=16, mlp_ratio=2.0, tie_embeddings=True, seed=0)


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _job(cfg: HyenaGLTConfig, ids: torch.Tensor, labels: torch.Tensor, chunk: int | None, kv: str | None,
         repeats: int, threads: int, keep: bool, log_every: float = 0) -> dict:
    from hyena_glt.inference import stream_logprobs

    torch.set_num_threads(threads)
    _mmap_large_allocations()
    model = build_causal_lm(cfg).eval()
    stream_logprobs(model, ids[:, :256], labels[:, :256], None if chunk is None else 64)  # warm the kernels
    base = _rss_mib()
    best = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        last = [t0]

        def tick(s: int, e: int, t0=t0, c0=c0, last=last) -> None:  # how far a long run got (readable if stopped)
            now = time.perf_counter()
            if log_every and now - last[0] >= log_every:
                last[0] = now
                print(f"#   {cfg.pattern}: {e:,} of {ids.shape[1]:,} bases after {now - t0:,.0f} s "
                      f"({time.process_time() - c0:,.0f} CPU s)", flush=True)

        logp = stream_logprobs(model, ids, labels, chunk, kv_dtype=None if kv is None else getattr(torch, kv),
                               progress=tick)
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    out = {"seconds": best, "cpu_seconds": cpu, "peak_mib": _rss_mib() - base,
           "bits_per_base": float(-logp.double().mean() / np.log(2)), "load": os.getloadavg()[0]}
    if keep:
        out["logp"] = logp[0].numpy()
    return out


def _attention_flops(cfg: HyenaGLTConfig, L: int) -> tuple[float, float]:
    """(FLOPs of the attention blocks' QK^T and AV over a causal sequence of L, of the whole
    forward), from the layer-kind registry."""
    from .gpu import forward_flops_per_token

    f = forward_flops_per_token(cfg, L)
    return f["attention"] * L, f["total"] * L


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(args) -> int:
    from launch.inference.evaluate import auto_chunk_size

    genome = read_genome(args.genome)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    longest = max(lengths + [args.long])
    if longest > len(genome) - 1:
        raise ValueError(f"--lengths/--long {longest}: the genome has {len(genome):,} bases")
    seq = torch.from_numpy(genome[: longest + 1].astype(np.int64) + 4)[None]  # byte ids: NUM_SPECIAL + byte
    attn, hyena = _config(args.pattern, args.d_model), _config(args.hyena_pattern, args.d_model)
    print(f"# bench stream: {_cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, "
          f"fp32, batch 1, d_model {args.d_model}; time best of {args.repeats}; peak = RSS increase of the call; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# attention model {args.pattern}, Hyena-only {args.hyena_pattern}; chunks of {args.chunk_size}; "
          f"`score` by default runs up to {auto_chunk_size(attn):,} bases in one pass", flush=True)
    print(f"{'bases':>9}{'run':>22}{'seconds':>9}{'cpu s':>9}{'peak MiB':>10}{'vs one pass':>12}{'(cpu)':>7}"
          f"{'max |dlogp|':>13}{'bits/base':>11}{'load':>6}", flush=True)
    rows = []
    for L in lengths:
        ids, labels = seq[:, :L], seq[:, 1 : L + 1]
        runs = [("one pass", attn, None, None), (f"chunked {args.chunk_size}", attn, args.chunk_size, None)]
        if not args.no_bf16:
            runs.append(("chunked, bf16 K/V", attn, args.chunk_size, "bfloat16"))
        runs.append(("Hyena-only one pass", hyena, None, None))
        ref = None
        for name, cfg, chunk, kv in runs:
            r = _in_child(_job, cfg, ids, labels, chunk, kv, args.repeats, args.threads, cfg is attn)
            logp = r.pop("logp", None)
            if ref is None:
                ref, one, one_cpu = logp, r["seconds"], r["cpu_seconds"]
            r.update(bases=L, run=name, pattern=cfg.pattern, chunk=chunk, kv_dtype=kv or "model")
            if cfg is attn:
                r["vs_one_pass"] = r["seconds"] / one
                r["cpu_vs_one_pass"] = r["cpu_seconds"] / one_cpu
                r["max_abs_dlogp"] = float(np.abs(logp - ref).max())
            rows.append(r)
            ratio = f"{r['vs_one_pass']:.2f}x" if "vs_one_pass" in r else ""
            cpu_ratio = f"{r['cpu_vs_one_pass']:.2f}x" if "cpu_vs_one_pass" in r else ""
            diff = f"{r['max_abs_dlogp']:.1e}" if "max_abs_dlogp" in r else ""
            print(f"{L:>9,}{name:>22}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['peak_mib']:>10.0f}{ratio:>12}"
                  f"{cpu_ratio:>7}{diff:>13}{r['bits_per_base']:>11.4f}{r['load']:>6.1f}", flush=True)

    # The attention blocks' measured rate: the attention model's one pass minus the Hyena-only
    # one, in CPU seconds (per thread: CPU time / threads), which the machine's load moves least.
    rate = None
    if lengths:
        print(f"\n{'bases':>9}{'attention GFLOP':>17}{'% of model':>12}{'attention cpu s':>17}{'GFLOP/s':>9}")
    for L in lengths:
        by = {r["run"]: r for r in rows if r["bases"] == L}
        fl, total = _attention_flops(attn, L)
        extra = (by["one pass"]["cpu_seconds"] - by["Hyena-only one pass"]["cpu_seconds"]) / args.threads
        rate = fl / extra if extra > 0 else rate
        print(f"{L:>9,}{fl / 1e9:>17.1f}{100 * fl / total:>11.1f}%{extra:>17.2f}"
              f"{(fl / extra / 1e9 if extra > 0 else float('nan')):>9.1f}", flush=True)

    rate = args.attention_gflops * 1e9 if args.attention_gflops else rate
    long_rows = []
    if args.long:
        L = args.long
        ids, labels = seq[:, :L], seq[:, 1 : L + 1]
        patterns = (args.long_patterns or f"{args.pattern},{args.hyena_pattern}").split(",")
        where = f"{args.attention_gflops} GFLOP/s (given)" if args.attention_gflops else \
            (f"the rate measured at {lengths[-1]:,}" if lengths else "none measured")
        print(f"\n# {L:,} bases streamed; expected = the Hyena-only model's CPU s + attention FLOPs / {where}")
        print(f"{'pattern':>10}{'chunk':>9}{'seconds':>10}{'cpu s':>10}{'peak MiB':>10}{'bits/base':>11}"
              f"{'attention TFLOP':>17}{'expected cpu s':>16}{'load':>6}", flush=True)
        hyena_s = None
        for pattern in sorted(patterns, key=lambda p: "*" in p):  # the Hyena-only model first
            cfg = _config(pattern, args.d_model)
            chunk = args.long_chunk or auto_chunk_size(cfg, 1, L) or L
            fl, _ = _attention_flops(cfg, L)
            expected = None
            if fl and rate and hyena_s is not None:
                expected = hyena_s + fl / rate
                print(f"# {pattern}: expected about {expected:,.0f} s", flush=True)
            r = _in_child(_job, cfg, ids, labels, chunk, None, 1, args.threads, False, args.log_every)
            if not fl:
                hyena_s = r["cpu_seconds"] / args.threads
            r.update(bases=L, pattern=pattern, chunk=chunk, attention_tflop=fl / 1e12, expected_s=expected)
            long_rows.append(r)
            print(f"{pattern:>10}{chunk:>9,}{r['seconds']:>10.1f}{r['cpu_seconds']:>10.1f}{r['peak_mib']:>10.0f}"
                  f"{r['bits_per_base']:>11.4f}{fl / 1e12:>17.1f}{(f'{expected:,.0f}' if expected else ''):>16}"
                  f"{r['load']:>6.1f}", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    result = {"cpu": _cpu_name(), "threads": args.threads, "load_end": os.getloadavg()[0], "rows": rows, "long": long_rows,
              "attention_gflop_s": rate / 1e9 if rate else None,
              "args": {k: v for k, v in vars(args).items() if k != "func"}}
    print(json.dumps(result, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
