"""torchrun worker: parallel layouts against the single-process model, same seed, same batch.

One launch runs one case (`parallel_worker.py --tp 2 ...`) or, with `--cases FILE` (a JSON list
of {"id", "args"}), every case of one world size in turn: the process group stays up between
cases and only megatron-core's groups are rebuilt, so the torch / megatron-core start-up of
each process is paid once. Each case prints `CASE <id> OK <errors>` or `CASE <id> FAIL <first
errors>` on rank 0; a case that raises ends the launch (the ranks may be inside a collective).

Every rank builds the single-device model (HyenaGLTForCausalLM, or the token-merging
BLTForCausalLM with --patching; the reference) and this rank's
parallel model, and checks:
* initial weights: gathered parallel state dict == reference state dict, and
  shard_state_dict(reference) == this rank's parameters, both bit for bit (same weights in
  every layout);
* loss sum and weight sum of the whole global batch;
* logits of this DP rank's micro-batches (gathered over TP and CP; on the last stage);
* every parameter gradient, gathered to full shape (TP and PP) after DP x CP reduction.

Tolerance (fp64): |parallel - reference| <= RTOL * max|reference| + ATOL per tensor.
Prints PARALLEL_OK on rank 0 and exits 0 only if every check on every rank passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

RTOL = {"float64": 1e-10, "float32": 1e-5}
ATOL = {"float64": 1e-13, "float32": 1e-6}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", help="a JSON list of {id, args}: run them all in this launch")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--pattern", default="SDH*SDH*")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--genomic", action="store_true", help="seq-type embedding, motif branch, conservation")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--cp-long-conv", default="state", choices=["state", "all2all"])
    ap.add_argument("--medium-filter-len", type=int, default=16)
    ap.add_argument("--long-filter-check", action="store_true", help="CP: prove the H filter spans the sequence")
    ap.add_argument("--patching", default="none", help="token merging: the U-shape (static, entropy, learned)")
    ap.add_argument("--evo2", action="store_true", help="every Evo-2-shaped architecture option on (docs/evo2.md)")
    return ap.parse_args(argv)


def make_micro_batch(gen: torch.Generator, b: int, L: int, genomic: bool) -> dict:
    # Ids stay below 260 (bytes + specials) for every vocab size, padded 512 rows included.
    ids = torch.randint(4, 260, (b, L), generator=gen)
    labels = torch.randint(4, 260, (b, L), generator=gen)
    u = torch.rand(b, L, generator=gen)
    weights = torch.where(u < 0.15, 0.1, 1.0)  # soft-masked bases
    weights[u > 0.9] = 0.0
    labels[u > 0.95] = -100  # ignored targets carry weight 0
    mb = {"input_ids": ids, "labels": labels, "loss_weights": weights}
    if genomic:
        mb["seq_type"] = torch.randint(0, 4, (b,), generator=gen)
        mb["conservation"] = torch.rand(b, L, generator=gen)
    return mb


def close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> tuple[bool, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return False, float("inf")
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return err <= RTOL[dtype] * scale + ATOL[dtype], err / max(scale, 1e-300)


def run_case(args: argparse.Namespace) -> tuple[int, dict, list[str]]:
    """One layout against the reference: (failed checks over all ranks, worst errors, this rank's errors)."""
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # the reference is built directly in this dtype
    torch.set_num_threads(1)

    from hyena_glt import HyenaGLTConfig, build_causal_lm
    from megatron_adapters import (
        ParallelConfig,
        build_parallel_model,
        gather_full_state_dict,
        initialize_parallel,
        shard_state_dict,
    )

    L = args.seq_len
    merging = {}
    if args.patching != "none":
        # Small local models with attention (encoder) and H (decoder) so every block kind runs sharded.
        merging = dict(patching=args.patching, patch_size=4, max_patch=8, local_encoder_pattern="S*",
                       local_decoder_pattern="SH", entropy_d_model=16, entropy_pattern="SD")
    evo2 = {}
    if args.evo2:
        evo2 = dict(norm_eps_placement="outside", mixer_out_bias=True, mlp_activation="identity",
                    first_mlp_activation="gelu", medium_decay=False, short_filter_skip=False, mlp_hidden_size=48,
                    rope_position_scale=4.0, vocab_size=512)
    cfg = HyenaGLTConfig(
        pattern=args.pattern,
        d_model=args.d_model,
        num_heads=4,
        num_filter_groups=4,
        max_seq_len=L,  # modal time constants reach the whole sequence
        medium_filter_len=args.medium_filter_len,
        modal_order=4,
        tie_embeddings=not args.untied,
        seq_type_embedding=args.genomic,
        motif_branch=args.genomic,
        motif_kernel_sizes=[3, 6],
        conservation=args.genomic,
        seed=7,
        **merging,
        **evo2,
    )
    pcfg = ParallelConfig(tp=args.tp, cp=args.cp, pp=args.pp, sp=args.sp, vpp=args.vpp,
                          cp_long_conv=args.cp_long_conv)
    from megatron_adapters.context_parallel import traffic

    traffic.clear()  # counters accumulate per process; this case's path is checked below
    layout = initialize_parallel(pcfg, cfg, seq_length=L)
    rank = dist.get_rank()
    coords = layout.coords(rank)
    pm = build_parallel_model(cfg, layout, dtype=dtype)
    ref = build_causal_lm(cfg)
    errors: list[str] = []
    worst: dict[str, float] = {}

    def check(what: str, a, b, group: str) -> None:
        ok, rel = close(a, b, args.dtype)
        worst[group] = max(worst.get(group, 0.0), rel)
        if not ok:
            errors.append(f"rank {rank}: {what}: relative error {rel:.3e}")

    # ---- point 6: the same full weights in every layout, both directions
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}
    full0 = gather_full_state_dict(pm)
    if set(full0) != set(ref_params):
        errors.append(f"rank {rank}: gathered keys differ: {sorted(set(full0) ^ set(ref_params))[:5]}")
    for k in sorted(set(full0) & set(ref_params)):
        if not torch.equal(full0[k], ref_params[k]):
            errors.append(f"rank {rank}: initial weight {k} differs from the single-device init")
    shard = shard_state_dict(ref.state_dict(), layout, rank)  # parameters and persistent buffers
    local = {**pm.state_dict(), **dict(pm.named_persistent_buffers())}
    if set(shard) != set(local):
        errors.append(f"rank {rank}: shard keys differ: {sorted(set(shard) ^ set(local))[:5]}")
    for k in sorted(set(shard) & set(local)):
        if not torch.equal(shard[k], local[k].cpu()):
            errors.append(f"rank {rank}: shard_state_dict({k}) differs from the built shard")

    # ---- the global batch: dp * M micro-batches; DP rank d takes micro-batches [d*M, (d+1)*M)
    dp, M, b = layout.dp, args.micro_batches, args.micro_batch_size
    gen = torch.Generator().manual_seed(1234)
    all_mbs = [make_micro_batch(gen, b, L, args.genomic) for _ in range(dp * M)]
    mine = all_mbs[coords.dp * M : (coords.dp + 1) * M]

    def cat(key):
        return torch.cat([mb[key] for mb in all_mbs]) if key in all_mbs[0] else None

    out = ref(
        cat("input_ids"), cat("labels"), cat("loss_weights"), seq_type=cat("seq_type"), conservation=cat("conservation")
    )
    (out.loss_sum / out.weight_sum).backward()

    logits: list[torch.Tensor] = []
    loss_sum, weight_sum = pm.forward_backward(mine, logits_out=logits)
    if args.cp > 1:  # the path under test is the one that ran
        from megatron_adapters.context_parallel import traffic

        # The U-shape's global blocks see the (padded) patch slots, a shorter sequence than the bytes.
        shortest = L if args.patching == "none" else pm.chunks[0].lm.model.block_slots(cfg.patch_slots(L))
        chunk_covers_d_halo = args.medium_filter_len - 1 <= shortest // (2 * args.cp)
        used_all2all = traffic.get("long_conv/all2all", 0) > 0
        if used_all2all != (args.cp_long_conv == "all2all" or ("D" in cfg.layers and not chunk_covers_d_halo)):
            errors.append(f"rank {rank}: cp_long_conv={args.cp_long_conv} but all-to-all bytes = {traffic.get('long_conv/all2all', 0)}")
    # The U-shape reports its LM part; the backward also carries the patcher's terms (in out.loss_sum).
    check("loss_sum", loss_sum, out.lm_loss_sum if args.patching != "none" else out.loss_sum, "loss")
    check("weight_sum", weight_sum, out.weight_sum, "loss")
    if pm.holds_loss:
        if len(logits) != M:
            errors.append(f"rank {rank}: expected {M} logits tensors on the last stage, got {len(logits)}")
        for i, lg in enumerate(logits):
            j = (coords.dp * M + i) * b
            check(f"logits of micro-batch {i}", lg, out.logits[j : j + b], "logits")
    elif logits:
        errors.append(f"rank {rank}: non-last stage returned logits")

    grads = gather_full_state_dict(pm, grads=True)
    for name, p in ref.named_parameters():
        if name not in grads:
            errors.append(f"rank {rank}: no gathered grad for {name}")
            continue
        # No grad: a parameter the loss does not reach (the U-shape's global blocks get no conservation).
        check(f"grad {name}", grads[name], p.grad if p.grad is not None else torch.zeros_like(p), "grads")

    # ---- CP: the test would catch a CP that convolves its shards separately
    if args.long_filter_check:
        import megatron_adapters.context_parallel as cpar
        from hyena_glt.fftconv import causal_conv

        # (a) In the reference, the first H layer's output at the last position depends on the
        # first chunk of input; nothing before it (short S/D filters, no attention) reaches that far.
        h_layer = next(i for i, c in enumerate(cfg.layers) if c == "H")
        assert "*" not in cfg.layers[:h_layer], "the long-filter check needs H before any attention"
        seen = {}
        hook = ref.model.layers[h_layer].mixer.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o))
        with torch.no_grad():
            ids = all_mbs[0]["input_ids"].clone()
            ref(ids)
            y0 = seen["y"][:, -1].clone()
            ids[:, : L // (2 * args.cp)] = torch.randint(4, 260, (b, L // (2 * args.cp)), generator=gen)
            ref(ids)
            y1 = seen["y"][:, -1]
        hook.remove()
        reach = ((y1 - y0).abs().max() / y0.abs().max()).item()
        worst["H_last_vs_first_chunk"] = reach
        if reach < 1e-3:
            errors.append(f"rank {rank}: H output at L-1 barely depends on the first chunk ({reach:.2e}): L too short")

        # (b) Mutation: convolving each rank's zigzag chunks separately must fail the logits check.
        def shard_local(z, filt, group, path):
            n = z.shape[-1] // 2
            return torch.cat([causal_conv(p, filt.filter(n), filt.skip) for p in (z[..., :n], z[..., n:])], -1)

        real = cpar.long_conv
        cpar.long_conv = shard_local
        try:
            bad: list[torch.Tensor] = []
            pm.forward_backward(mine, forward_only=True, logits_out=bad)
        finally:
            cpar.long_conv = real
        if pm.holds_loss:
            ok, rel = close(bad[0], out.logits[coords.dp * M * b : coords.dp * M * b + b], args.dtype)
            worst["shard_local_mutant_logits"] = rel
            if ok:
                errors.append(f"rank {rank}: a shard-local long convolution passed the logits check")

    # ---- verdict: every rank reports
    n_bad = torch.tensor([len(errors)], dtype=torch.int64)
    dist.all_reduce(n_bad)
    maxes = [None] * dist.get_world_size()
    dist.all_gather_object(maxes, worst)
    keys = sorted({k for m in maxes for k in m})
    summary = {k: f"{max(m.get(k, 0.0) for m in maxes):.2e}" for k in keys}
    summary["layout"] = pcfg.describe(layout.world_size)
    summary["tolerance"] = f"rtol={RTOL[args.dtype]} atol={ATOL[args.dtype]}"
    return int(n_bad.item()), summary, errors


def main() -> int:
    args = parse()
    torch.set_num_threads(1)
    if not args.cases:
        n_bad, summary, errors = run_case(args)
        for e in errors[:20]:
            print(e, file=sys.stderr, flush=True)
        if dist.get_rank() == 0 and n_bad == 0:
            print("PARALLEL_OK " + json.dumps(summary), flush=True)
        from megatron_adapters import destroy_parallel

        destroy_parallel()
        assert n_bad == 0, f"{n_bad} check(s) failed (see stderr)"
        return 0
    from megatron.core import parallel_state as ps

    cases = json.loads(open(args.cases).read())
    failed = 0
    for case in cases:
        try:
            n_bad, summary, errors = run_case(parse(case["args"]))
        except BaseException as e:  # peers may wait in a collective: end the launch, naming the case
            print(f"CASE {case['id']} RAISED on rank {int(os.environ.get('RANK', 0))}: {type(e).__name__}: {e}",
                  flush=True)
            raise
        finally:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, errors[:5])
        if dist.get_rank() == 0:
            first = [e for errs in gathered for e in errs][:10]
            verdict = "OK" if n_bad == 0 else "FAIL"
            print(f"CASE {case['id']} {verdict} " + json.dumps(summary if n_bad == 0 else first), flush=True)
        failed += n_bad > 0
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
