"""`hyena-glt bench cp`: what context parallelism sends for `D` and `H` layers, both paths.

For each layer code and sequence length, `--cp` processes (gloo on CPU, NCCL on GPUs) run
one block built with the parallel spec (megatron_adapters.parallel_spec) fwd+bwd on their
zigzag shares, once with `cp_long_conv=all2all` and once with `state`, and report the
payload bytes each rank handed to CP collectives for the layer's long convolution per step,
forward and backward (counted where the collectives are called,
megatron_adapters.context_parallel.traffic), and the step time. The featurizer's halo is the
same in both paths and is kept out of the comparison (it is in the JSON).
"""

from __future__ import annotations

import json
import os
import time

import torch

from launch.args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--cp", type=positive_int, default=2)
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--lengths", default="8192,32768", help="comma-separated global sequence lengths")
    p.add_argument("--layers", default="DH", help="layer codes to measure")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed steps (after one warm-up); the fastest is kept")


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from hyena_glt.config import HyenaGLTConfig
    from hyena_glt.layers import Block
    from hyena_glt.params import initialize
    from launch.plan.cost import cp_bytes
    from megatron_adapters import context_parallel as cpar
    from megatron_adapters.build import megatron_config, parallel_device
    from megatron_adapters.groups import RankContext, initialize_parallel
    from megatron_adapters.parallel_config import ParallelConfig
    from megatron_adapters.spec import parallel_spec

    rows = []
    device = parallel_device()
    for L in args["lengths"]:
        for code in args["layers"]:
            for path in ("all2all", "state"):
                cfg = HyenaGLTConfig(pattern=code, d_model=args["d_model"], num_heads=max(args["cp"], args["d_model"] // 64),
                                     num_filter_groups=16, max_seq_len=L)
                pcfg = ParallelConfig(cp=args["cp"], cp_long_conv=path)
                layout = initialize_parallel(pcfg, cfg, seq_length=L)
                ctx = RankContext.current(layout)
                block = Block(code, cfg, 0, spec=parallel_spec(ctx, megatron_config(pcfg, cfg, torch.float32)))
                weights = Block(code, cfg, 0)  # CP alone splits no weight: the single-device ones load as they are
                initialize(weights, 0)
                block.load_state_dict(weights.state_dict())
                block = block.to(device)
                g = torch.Generator().manual_seed(0)
                x_full = torch.randn(L, 1, args["d_model"], generator=g)
                x = cpar.zigzag_slice(x_full, args["cp"], ctx.coords.cp, dim=0).to(device).requires_grad_()

                def step():
                    block.zero_grad(set_to_none=True)
                    block(x).square().mean().backward()

                step()  # warm-up
                cpar.traffic.clear()
                best = float("inf")
                for _ in range(args["repeats"]):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dist.barrier()
                    t0 = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                sent = {k: v / args["repeats"] for k, v in cpar.traffic.items()}
                # the planner's traffic model for the same block (launch/plan/cost.py)
                predicted = cp_bytes(cfg, L, 1, args["cp"], 1, ctx.coords.cp, x.element_size(), path, codes=code)
                rows.append({"L": L, "layer": code, "path": path, "ms": best * 1e3, "bytes": sent,
                             "predicted_bytes": predicted})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run(args) -> int:
    import tempfile

    import torch.multiprocessing as mp

    from hyena_glt.kinds import layer_kind
    from launch.net import free_port

    lengths = [int(x) for x in args.lengths.split(",")]
    spec = {"cp": args.cp, "d_model": args.d_model, "lengths": lengths, "layers": args.layers, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.cp, free_port(), spec, out), nprocs=args.cp, join=True)
        with open(out) as f:
            rows = json.load(f)
    print(f"# bench cp: cp={args.cp}, d_model={args.d_model}, batch 1, fp32, fwd+bwd of one block, bytes sent per rank "
          f"per step by the layer's long convolution (the featurizer's halo is the same in both paths)")
    print(f"{'layer':<34}{'L':>8}{'path':>9}{'MiB sent':>11}{'ms':>10}{'state/all2all bytes':>21}")
    by = {(r["L"], r["layer"], r["path"]): r for r in rows}
    summary = []
    for L in lengths:
        for code in args.layers:
            a, s = by[L, code, "all2all"], by[L, code, "state"]
            # The featurizer's halo (short_conv/halo) is the same in both paths: compare the long convolution's.
            nbytes = {k: sum(v for n, v in r["bytes"].items() if n.startswith("long_conv/"))
                      for k, r in (("all2all", a), ("state", s))}
            if not nbytes["all2all"]:  # a kind without a long convolution (S, *): only halos / K/V
                continue
            ratio = nbytes["state"] / nbytes["all2all"]
            summary.append({"L": L, "layer": code, "all2all_bytes": nbytes["all2all"], "state_bytes": nbytes["state"],
                            "ratio": ratio, "all2all_ms": a["ms"], "state_ms": s["ms"]})
            for r in (a, s):
                print(f"{code + ' ' + layer_kind(code).name:<34}{L:>8}{r['path']:>9}{nbytes[r['path']] / 2**20:>11.3f}"
                      f"{r['ms']:>10.1f}{(f'1/{1 / ratio:.0f}' if r is s else ''):>21}", flush=True)
    result = {"bench": "cp", "cp": args.cp, "d_model": args.d_model, "rows": rows, "summary": summary}
    print("\n" + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
