"""`hyena-glt calibrate --out FILE`: this machine's hardware profile, measured.

A CPU "device" is `--cores-per-device` cores (one rank's threads). Measured, each in a forked
child with that many threads:
  peak_tflops         the best plain fp32 GEMM (1024^3, or --seq-len x --d-model x 4 d_model)
  achieved            per FLOP term: that MLP-shaped matmul fwd+bwd, causal attention
                      (scaled_dot_product_attention) and the model's causal convolution
                      (hyena_glt.fftconv.causal_conv of a 128-tap filter), fwd+bwd
  kind_achieved       one block of every registered layer kind on --micro-batch sequences of
                      --seq-len (as `bench ops` times one): the block's FLOPs x 3 / its fwd+bwd
                      time, as a fraction of peak
  memory_bandwidth    a copy of a 256 MiB tensor (read + write)
  links               gloo between two processes on this machine, each call after a few ms of
                      compute as in training, by its mean: a point-to-point exchange (the
                      link's own rate) and each collective (`ops`), at 64 KiB and 8 MiB: the
                      latency from the small, the bandwidth from the large (intra_node =
                      inter_node: one machine)
  memory_gib          MemTotal / devices
  runtime_gib         a 1-rank training run's peak beyond the memory model's total (the trainer's
                      buffers and the allocator's slack, launch/plan/measure.py)
"""

from __future__ import annotations

import os
import platform
import time

import yaml

from launch.args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="the profile YAML to write")
    p.add_argument("--d-model", type=positive_int, default=256, help="width of the measured blocks")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens of the measured blocks")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per measured block call (the "
                   "runs' train.micro_batch_size: per-token rates differ with it)")
    p.add_argument("--cores-per-device", type=positive_int, default=1, help="cores (threads) of one rank")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each measurement (the best is kept)")


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _compute_job(d_model: int, L: int, batch: int, threads: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hyena_glt.config import HyenaGLTConfig
    from hyena_glt.fftconv import causal_conv
    from hyena_glt.kinds import KINDS
    from hyena_glt.layers import Block
    from hyena_glt.params import initialize

    from .cost import block_flops

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    D = d_model
    x = torch.randn(L, D, generator=g, requires_grad=True)
    w = torch.randn(4 * D, D, generator=g, requires_grad=True)

    def matmul():
        (x @ w.t()).square().mean().backward()

    # peak: the best plain fp32 GEMM (no autograd), square or of the MLP's shape
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    with torch.no_grad():
        peak = max(2.0 * 1024**3 / _best(lambda: a @ b, repeats),
                   2.0 * L * D * 4 * D / _best(lambda: x @ w.t(), repeats))
    mlp_rate = 3 * 2.0 * L * D * 4 * D / _best(matmul, repeats)
    heads = max(1, D // 64)
    q, k, v = (torch.randn(1, heads, L, D // heads, generator=g, requires_grad=True) for _ in range(3))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).square().mean().backward()

    attn_flops = 3 * 2.0 * 2 * D * (L + 1) / 2 * L
    z = torch.randn(1, D, L, generator=g, requires_grad=True)
    h = (torch.randn(D, 128, generator=g) * 0.02).requires_grad_()

    def conv():
        causal_conv(z, h).square().mean().backward()

    conv_flops = 3 * 2.0 * D * 128 * L
    achieved = {"matmul": mlp_rate / peak, "attention": attn_flops / _best(attention, repeats) / peak,
                "conv": conv_flops / _best(conv, repeats) / peak}
    kinds = {}
    for code in KINDS:
        cfg = HyenaGLTConfig(pattern=code, d_model=D, num_heads=heads, num_filter_groups=16, max_seq_len=L)
        block = Block(code, cfg, 0)
        initialize(block, 0)
        xb = torch.randn(batch, L, D, generator=g, requires_grad=True)

        def step():
            block.zero_grad(set_to_none=True)
            block(xb).square().mean().backward()

        flops = 3 * sum(block_flops(code, cfg, L).values()) * L * batch
        kinds[code] = flops / _best(step, repeats) / peak
    big = torch.empty(2**26)  # 256 MiB
    out = torch.empty_like(big)
    bw = 2 * big.numel() * 4 / _best(lambda: out.copy_(big), repeats)
    return {"peak": peak, "achieved": achieved, "kinds": kinds, "bandwidth": bw}


# What the link probe times, as training issues them: each one after a few milliseconds of a
# rank's own compute (so a rank that sleeps in a collective is woken as in training, and the
# ranks arrive as unevenly), by the mean of many. Full-tensor sizes: the small one gives the
# latency, the large one the bandwidth.
LINK_SIZES = (1 << 16, 1 << 23)
LINK_OPS = ("exchange", "all_reduce", "all_gather", "reduce_scatter")


def _link_worker(rank: int, port: int, repeats: int, out: str) -> None:
    import json
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # torch's renames of the collectives, once per rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    work = torch.randn(384, 384)
    times: dict = {}
    for nbytes in LINK_SIZES:
        full, half = torch.randn(nbytes // 4), torch.randn(nbytes // 8)
        got_full, got_half = torch.empty_like(full), torch.empty_like(half)

        def exchange():  # both ranks send the whole tensor to the other, as halos and pipeline stages do
            ops = [dist.P2POp(dist.isend, full, 1 - rank), dist.P2POp(dist.irecv, got_full, 1 - rank)]
            for r in dist.batch_isend_irecv(ops):
                r.wait()

        calls = {"exchange": exchange, "all_reduce": lambda: dist.all_reduce(full),
                 "all_gather": lambda: dist.all_gather_into_tensor(got_full, half),
                 "reduce_scatter": lambda: dist.reduce_scatter_tensor(got_half, full)}
        for name in LINK_OPS:
            spent = []
            dist.barrier()
            for i in range(4 + 8 * repeats):
                for _ in range(4):
                    work @ work
                t0 = time.perf_counter()
                calls[name]()
                if i >= 4:
                    spent.append(time.perf_counter() - t0)
            times.setdefault(name, {})[nbytes] = sum(spent) / len(spent)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def _link(repeats: int) -> dict:
    """Each op's latency and bandwidth on 2 ranks, in the ring accounting of launch/plan/cost.py
    (all-reduce: the bytes once and 2 latencies; all-gather and reduce-scatter: half the bytes
    and 1; an exchange: the bytes and 1)."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    from launch.net import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "link.json")
        mp.spawn(_link_worker, args=(free_port(), repeats, out), nprocs=2, join=True)
        with open(out) as f:
            times = {op: {int(k): v for k, v in t.items()} for op, t in json.load(f).items()}
    small, large = LINK_SIZES
    rates = {}
    for op, t in times.items():
        share, messages = {"all_reduce": (1.0, 2), "all_gather": (0.5, 1), "reduce_scatter": (0.5, 1)}.get(op, (1.0, 1))
        bandwidth = share * (large - small) / max(t[large] - t[small], 1e-9)
        latency = max(0.0, (t[small] - share * small / bandwidth) / messages)
        rates[op] = {"bandwidth_gbs": bandwidth / 1e9, "latency_us": latency * 1e6}
    link = {**rates.pop("exchange"), "ops": rates}
    return {"link": link, "seconds": times}


def run(args) -> int:
    from launch.bench.ops import _in_child

    cores = os.cpu_count() or 1
    devices = max(1, cores // args.cores_per_device)
    print(f"# calibrate: {cores} cores, {devices} device(s) of {args.cores_per_device} core(s); d_model "
          f"{args.d_model}, {args.micro_batch} x {args.seq_len} tokens; load average {os.getloadavg()[0]:.1f}", flush=True)
    c = _in_child(_compute_job, args.d_model, args.seq_len, args.micro_batch, args.cores_per_device, args.repeats)
    print(f"peak (fp32 GEMM) {c['peak'] / 1e9:.1f} GFLOP/s; achieved "
          + ", ".join(f"{k} {v:.3f}" for k, v in c["achieved"].items())
          + "; per kind " + ", ".join(f"{k} {v:.3f}" for k, v in c["kinds"].items())
          + f"; memory {c['bandwidth'] / 1e9:.1f} GB/s", flush=True)
    probe = _link(args.repeats)
    link = probe["link"]
    print("gloo, between compute (latency, bandwidth): " + ", ".join(
        f"{op} {r['latency_us']:.0f} us {r['bandwidth_gbs']:.2f} GB/s"
        for op, r in {"exchange": link, **link["ops"]}.items()), flush=True)
    runtime = _runtime(args)
    print(f"trainer memory beside the model's tensors (1 rank, 2 steps): {runtime / 2**20:.0f} MiB", flush=True)
    with open("/proc/meminfo") as f:
        total = int(next(x for x in f if x.startswith("MemTotal")).split()[1]) * 1024
    profile = {
        "name": f"cpu-{platform.node() or 'local'}",
        "description": f"{_cpu_name()}: {devices} device(s) of {args.cores_per_device} core(s), calibrated "
                       f"{time.strftime('%Y-%m-%d')} (hyena-glt calibrate)",
        "peak_tflops": c["peak"] / 1e12,
        "memory_gib": total / 2**30 / devices,
        "usable_memory": 0.9,
        "memory_bandwidth_gbs": c["bandwidth"] / 1e9,
        "devices_per_node": devices,
        "runtime_gib": runtime / 2**30,
        "cores_per_device": args.cores_per_device,
        "intra_node": link,
        "inter_node": link,
        "achieved": c["achieved"],
        "kind_achieved": c["kinds"],
        "calibration": {"d_model": args.d_model, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                        "repeats": args.repeats,
                        "load_average": os.getloadavg()[0], "collective_s": probe["seconds"]},
    }
    from .hardware import Hardware

    Hardware.model_validate(profile)  # what load_hardware will accept
    with open(args.out, "w") as f:
        f.write("# written by `hyena-glt calibrate`; fields: launch/plan/hardware.py\n")
        yaml.safe_dump(profile, f, sort_keys=False)
    print(f"wrote {args.out}")
    return 0


def _runtime(args) -> float:
    """A 1-rank run of the measured config (launch/plan/measure.py) at --d-model and --seq-len, 2 steps."""
    import tempfile
    from pathlib import Path

    from .measure import BASE, pack, runtime_bytes

    with tempfile.TemporaryDirectory(prefix="hyena-glt-calibrate-") as tmp:
        work = Path(tmp)
        data = pack(work, args.seq_len)
        overrides = [*BASE, f"model.d_model={args.d_model}", f"model.max_seq_len={args.seq_len}",
                     f"train.seq_len={args.seq_len}", "train.steps=2", f"data.train={data}", f"data.val={data}"]
        return max(0.0, runtime_bytes(overrides, work / "run")[0])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(x for x in f if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "cpu"
