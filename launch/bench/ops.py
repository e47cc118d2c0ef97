"""`hyena-glt bench ops`: per-layer fwd+bwd time and peak memory, the H/S and attention/H
ratios, and each long convolution by every exact path (FFT, blocked, the plain reference)
with the one the dispatch picks.

Every measurement runs in a forked child process so the peak resident-memory increase
(ru_maxrss after minus before) belongs to that measurement alone. CPU torch has no
allocator statistics; on a GPU the CUDA allocator's peak is reported instead.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time

import torch

from hyena_glt.config import HyenaGLTConfig
from hyena_glt.fftconv import (
    causal_conv,
    causal_conv_blocked,
    causal_conv_fft,
    causal_conv_reference,
    conv_path,
)
from hyena_glt.filters import ModalFilter
from hyena_glt.kinds import KINDS, layer_kind
from hyena_glt.layers import Block
from hyena_glt.modal import modal_conv, modal_path
from hyena_glt.params import initialize
from launch.args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--lengths", default="4096,16384,65536", help="comma-separated sequence lengths")
    p.add_argument("--ops", default=None, help="layer codes to measure (default: every registered layer kind)")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed repetitions (after one warm-up)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads in each timed process (default: torch's own count, every core)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(fn, device: str, repeats: int) -> dict:
    """Warm up once, then time `repeats` calls; report mean seconds and peak memory delta."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB
    return {"seconds": seconds, "peak_mib": peak}


def _layer_job(code: str, d_model: int, L: int, device: str, dtype: torch.dtype, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = HyenaGLTConfig(pattern=code, d_model=d_model, num_heads=max(1, d_model // 64), num_filter_groups=16, max_seq_len=L)
    block = Block(code, cfg, 0)
    initialize(block, 0)
    block = block.to(device=device, dtype=dtype)
    x = torch.randn(1, L, d_model, device=device, dtype=dtype, requires_grad=True)

    def step():
        block.zero_grad(set_to_none=True)
        block(x).float().square().mean().backward()

    return _measure(step, device, repeats)


def _conv_job(filt: str, path: str, d_model: int, L: int, device: str, repeats: int, threads: int) -> dict:
    """One causal convolution by one path, fwd+bwd: the `H` filter (modal, order 16) or a
    128-tap `D`-shaped filter; `dispatch` is what the model itself runs."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, d_model, L, generator=g).to(device).requires_grad_()
    if filt == "H":
        f = ModalFilter(d_model, 16, L).to(device)
        initialize(f, 0)
        fns = {"fft": lambda: causal_conv_fft(z, f.filter(L)),
               "blocked": lambda: modal_conv(z, f.residues, f.log_rates)[0],
               "reference": lambda: causal_conv_reference(z, f.filter(L))}
        fns["dispatch"] = fns[modal_path(L)]
    else:
        h = (torch.randn(d_model, 128, generator=g) * 0.02).to(device).requires_grad_()
        fns = {"fft": lambda: causal_conv_fft(z, h), "blocked": lambda: causal_conv_blocked(z, h),
               "reference": lambda: causal_conv_reference(z, h), "dispatch": lambda: causal_conv(z, h)}
    fn = fns[path]

    def step():
        fn().square().mean().backward()

    return _measure(step, device, repeats)


def _in_child(target, *args) -> dict:
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


def run(args) -> int:
    args.threads = args.threads or torch.get_num_threads()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, convs = [], []
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# bench ops: d_model={args.d_model}, batch 1, {args.dtype}, fwd+bwd, device={args.device} ({device_name}), "
          f"threads={args.threads}, repeats={args.repeats}", flush=True)
    print(f"{'layer':<26}{'L':>8}{'fwd+bwd ms':>12}{'peak MiB':>10}", flush=True)
    codes = args.ops or "".join(KINDS)
    for L in lengths:
        for code in codes:
            r = _in_child(_layer_job, code, args.d_model, L, args.device, dtype, args.repeats, args.threads)
            rows.append({"layer": code, "name": layer_kind(code).name, "L": L, **r})
            print(f"{code + ' ' + layer_kind(code).name:<26}{L:>8}{r['seconds'] * 1e3:>12.1f}{r['peak_mib']:>10.0f}", flush=True)
    by = {(r["layer"], r["L"]): r["seconds"] for r in rows}
    ratios = []
    for L in lengths:
        entry = {"L": L}
        if ("H", L) in by and ("S", L) in by:
            entry["H_over_S"] = by["H", L] / by["S", L]
        if ("*", L) in by and ("H", L) in by:
            entry["attention_over_H"] = by["*", L] / by["H", L]
        ratios.append(entry)
    print(f"\n{'L':>8}{'H / S':>10}{'attention / H':>16}")
    for e in ratios:
        hs, ah = e.get("H_over_S"), e.get("attention_over_H")
        print(f"{e['L']:>8}{(f'{hs:.2f}x' if hs else '-'):>10}{(f'{ah:.2f}x' if ah else '-'):>16}")
    print(f"\n{'convolution (fwd+bwd ms)':<26}{'L':>8}{'fft':>9}{'blocked':>9}{'reference':>11}{'picks':>9}{'picked':>9}"
          f"{'vs ref':>8}")
    for L in lengths:
        for filt, label in (("H", "H modal, order 16"), ("D", "D 128 taps")):
            r = {path: _in_child(_conv_job, filt, path, args.d_model, L, args.device, args.repeats, args.threads)
                 for path in ("fft", "blocked", "reference", "dispatch")}
            pick = modal_path(L) if filt == "H" else conv_path(128, L)
            ms = {k: v["seconds"] * 1e3 for k, v in r.items()}
            convs.append({"L": L, "filter": filt, "picks": pick, **{k: {"ms": ms[k], "peak_mib": r[k]["peak_mib"]} for k in r}})
            print(f"{label:<26}{L:>8}{ms['fft']:>9.1f}{ms['blocked']:>9.1f}{ms['reference']:>11.1f}{pick:>9}"
                  f"{ms['dispatch']:>9.1f}{ms['reference'] / ms['dispatch']:>7.2f}x", flush=True)
    result = {"bench": "ops", "d_model": args.d_model, "dtype": args.dtype, "device": args.device,
              "device_name": device_name, "threads": args.threads, "layers": rows, "ratios": ratios, "convolutions": convs}
    print("\n" + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
