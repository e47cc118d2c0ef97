"""`hyena-glt bench gpu` (`make gpu-check`): the one prepared check for a CUDA machine.

(a) forward parity: a tiny model's fp32 logits on CUDA against the same model on CPU
    (max |cuda - cpu| / max |cpu| <= PARITY_TOLERANCE, else a non-zero exit);
(b) training: real `Trainer` runs (the `hyena-glt train` path) of the 1B-shaped config under
    torchrun (one process per GPU, NCCL), bf16: tokens/s, model FLOPs utilisation (MFU, the
    formula in docs/performance.md), peak CUDA memory, and striped Hyena vs attention-only
    (same width and depth, pattern of `*`) tokens/s at each length.

Without CUDA the same code runs as a CPU fallback: the tiny forward twice (bitwise equal) and
against fp64, and the training part on the tiny config in fp32 (gloo), so every code path but
the CUDA calls runs in CI; the CUDA part is reported as skipped and the exit status is 0.

Everything lands in --out (default $OUT, else runs/gpu-check): gpu_check.json and
gpu_check.txt. A time budget keeps the run inside a short GPU allocation: cases that would
start after it are reported as skipped, never silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from launch.args import positive_float, positive_int
from launch.net import free_port
from launch.plan.cost import forward_flops_per_token, mfu, train_flops_per_token  # noqa: F401  (bench gpu.X in tests)

REPO = Path(__file__).resolve().parents[2]
GENOME = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"  # 4.6 Mbp: 141 windows of 32K
CPU_GENOME = REPO / "data" / "genomes" / "lambda_phage.fasta.gz"  # 48 kbp packs in a blink, enough for the fallback
GPU_CONFIG = REPO / "configs" / "cluster_1b.yaml"
CPU_CONFIG = REPO / "configs" / "tiny.yaml"
# Measured on an H200: an 8192^3 bf16 matmul on random data ran at 769-798 TFLOP/s.
H200_BF16_PEAK_TFLOPS = 790.0
# fp32 on two devices differs only by summation order and FFT/attention kernels: ~1e-6
# relative on the tiny model. A real bug (a wrong layout, a dropped term) is O(1).
PARITY_TOLERANCE = 1e-4
PARITY_SHAPE = (2, 1024)  # batch, length: well past the 128-tap D filter, so the long-convolution paths run
RESULT_JSON, RESULT_TXT = "gpu_check.json", "gpu_check.txt"

# CUDA run: 1B shape at 8K and 32K, the same tokens per step at both lengths.
GPU_LENGTHS, GPU_TOKENS_PER_STEP, GPU_STEPS = (8192, 32768), 32768, 5
# CPU fallback: small enough for a test, the same code path.
CPU_LENGTHS, CPU_TOKENS_PER_STEP, CPU_STEPS = (256, 512), 1024, 3


def _lengths(text: str) -> list[int]:
    return [positive_int(x) for x in text.split(",")]


def add_arguments(p) -> None:
    # torch is imported by the functions that run, so that `hyena-glt --help` stays instant.
    p.add_argument("--out", metavar="DIR", help="where gpu_check.json and gpu_check.txt go (default $OUT, else runs/gpu-check)")
    p.add_argument("--config", help=f"training config whose model is measured (default: CUDA {GPU_CONFIG.name}, "
                   f"CPU {CPU_CONFIG.name})")
    p.add_argument("--lengths", type=_lengths, help="comma-separated context lengths (default: CUDA 8192,32768; "
                   "CPU 256,512)")
    p.add_argument("--tokens-per-step", type=positive_int, help="global batch x length, the same at every length "
                   f"(default: CUDA {GPU_TOKENS_PER_STEP}; CPU {CPU_TOKENS_PER_STEP})")
    p.add_argument("--steps", type=positive_int, help="training steps per case, the first is warm-up (default: CUDA "
                   f"{GPU_STEPS}; CPU {CPU_STEPS})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every training case, e.g. train.activation_checkpointing=false")
    p.add_argument("--peak-tflops", type=positive_float, default=H200_BF16_PEAK_TFLOPS,
                   help=f"per-GPU bf16 peak for MFU (default {H200_BF16_PEAK_TFLOPS:g}, measured on the H200)")
    p.add_argument("--time-budget", type=positive_float, default=300.0,
                   help="seconds for the whole check; training cases that would start after it are skipped")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs) under torchrun")


# ---------------------------------------------------------------------------- (a) forward parity
def _ieee_fp32() -> None:
    """fp32 matmuls and convolutions in full fp32, so CUDA can be held to CPU: cuDNN runs fp32
    convolutions in TF32 by default (10-bit mantissa, ~1e-3 relative). One API only: torch
    >= 2.9 refuses a mix of its fp32_precision settings and the legacy allow_tf32 flags."""
    import torch

    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    except AttributeError:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _tiny_config():
    import yaml

    from hyena_glt import HyenaGLTConfig

    model = yaml.safe_load(CPU_CONFIG.read_text())["model"]
    return HyenaGLTConfig(**{**model, "max_seq_len": PARITY_SHAPE[1]})


def _rel_err(a, ref) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def forward_check(use_cuda: bool) -> dict:
    """The tiny model's logits: CPU fp32 twice (must be bitwise equal), CPU fp32 against fp64,
    and, with CUDA, CUDA fp32 against CPU fp32 (the check); each error relative to max |ref|."""
    import torch

    from hyena_glt import build_causal_lm

    cfg = _tiny_config()
    B, L = PARITY_SHAPE
    ids = torch.randint(4, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    model = build_causal_lm(cfg).eval()
    with torch.no_grad():
        cpu = model(ids, labels=ids)
        again = model(ids).logits
        ref64 = model.double()(ids).logits
        model.float()
    out = {"model": f"{cfg.pattern}, d_model {cfg.d_model}", "batch": B, "seq_len": L, "dtype": "fp32",
           "tolerance": PARITY_TOLERANCE, "cpu_repeat_bitwise_equal": bool(torch.equal(cpu.logits, again)),
           "cpu_fp32_vs_fp64": _rel_err(cpu.logits, ref64), "cpu_loss": float(cpu.loss)}
    passed = out["cpu_repeat_bitwise_equal"] and out["cpu_fp32_vs_fp64"] <= PARITY_TOLERANCE
    if use_cuda:
        _ieee_fp32()
        with torch.no_grad():
            gpu = model.to("cuda")(ids.to("cuda"), labels=ids.to("cuda"))
            logits, loss = gpu.logits.cpu(), float(gpu.loss)
        del model, gpu
        torch.cuda.empty_cache()
        out.update(cuda_vs_cpu=_rel_err(logits, cpu.logits), cuda_vs_fp64=_rel_err(logits, ref64), cuda_loss=loss,
                   cuda_loss_rel_diff=abs(loss - out["cpu_loss"]) / abs(out["cpu_loss"]))
        passed = passed and out["cuda_vs_cpu"] <= PARITY_TOLERANCE and out["cuda_loss_rel_diff"] <= PARITY_TOLERANCE
    out["passed"] = bool(passed)
    return out


# ---------------------------------------------------------------------------- model FLOPs
# forward_flops_per_token, train_flops_per_token and mfu are the planner's (launch/plan/cost.py):
# one definition of model FLOPs for every MFU the project reports.


# ---------------------------------------------------------------------------- (b) training cases
def plan_cases(config: Path, lengths, tokens_per_step: int, steps: int, pack: Path, work: Path, extra: list[str],
               precision: str | None, nproc: int) -> list[dict]:
    """Per length, the config's striped model and an attention-only one of the same width and
    depth, the same tokens per step (micro-batch = tokens / L, no accumulation, split over
    data-parallel ranks). Validated here, before anything is launched."""
    from launch.training.config import TrainConfig

    cases = []
    base = TrainConfig.load(config).model
    # (length, kind, pattern, extra model settings) in run order: the striped model and
    # attention-only at every length, then the token-merging U-shape (learned patcher, mean
    # patch 4) at the first length, last so that a tight time budget skips it first.
    runs = [(L, kind, pattern, []) for L in lengths
            for kind, pattern in (("hyena", base.pattern), ("attention-only", "*" * base.num_layers))]
    runs.append((lengths[0], "token-merging", base.pattern, ["model.patching=learned", "model.patch_size=4"]))
    for L, kind, pattern, model_extra in runs:
        if tokens_per_step % (L * nproc):
            raise ValueError(f"--tokens-per-step {tokens_per_step} is not a multiple of length {L} x {nproc} processes")
        gb = tokens_per_step // L
        name = f"{kind}-{L}"
        overrides = [*model_extra, f"model.pattern={pattern}", f"model.max_seq_len={max(L, base.max_seq_len)}",
                     f"train.seq_len={L}", f"train.steps={steps}", f"train.global_batch_size={gb}",
                     f"train.micro_batch_size={gb // nproc}", "train.warmup_steps=1", "train.eval_batches=0",
                     "train.eval_every=0", "train.log_every=1", "zero.stage=0", "checkpoint.dir=null",
                     f"data.train={pack}", "data.val=null", f"out_dir={work / name}"]
        if precision:
            overrides.append(f"train.precision={precision}")
        overrides += extra
        cfg = TrainConfig.load(config, overrides)
        t = cfg.train
        cases.append({"name": name, "kind": kind, "seq_len": L, "pattern": cfg.model.pattern, "out_dir": cfg.out_dir,
                      "global_batch": gb,
                      "micro_batch": t.micro_batch_size, "steps": steps, "precision": t.precision,
                      "activation_checkpointing": t.activation_checkpointing, "overrides": overrides,
                      # The FLOPs formula counts the plain model; the U-shape reports tokens/s only.
                      "train_flops_per_token": train_flops_per_token(cfg.model, L) if not model_extra else None,
                      "forward_flops_per_token": forward_flops_per_token(cfg.model, L) if not model_extra else None})
    return cases




def _pack(genome: Path, L: int, work: Path) -> Path:
    out = work / "packed"
    subprocess.run([sys.executable, "-m", "launch.cli", "pack", str(genome), "--out", str(out), "--seq-len", str(L),
                    "--val-fraction", "0", "--progress", "none"], check=True, cwd=REPO, capture_output=True, text=True)
    return out


def _launch(spec: dict, work: Path, nproc: int, timeout: float) -> tuple[list[dict], str | None]:
    """torchrun running _worker; returns the cases it finished (written after each one, so a
    killed run still reports them) and an error line, if any."""
    spec_path, results_path = work / "spec.json", work / "results.json"
    spec_path.write_text(json.dumps({**spec, "results": str(results_path)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "launch.bench.gpu", str(spec_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    error = None
    # Its own session, so a timeout can stop torchrun and its worker together.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            error = f"torchrun exited with status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error = f"torchrun stopped after {timeout:.0f} s (time budget)"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    return results, error


def _run_case(case: dict, config: str, use_cuda: bool) -> dict:
    import gc

    import torch

    from launch.training.config import TrainConfig
    from launch.training.startup import check_start
    from launch.training.trainer import Trainer

    out = {"name": case["name"]}
    t0 = time.monotonic()
    if use_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        cfg = TrainConfig.load(config, case["overrides"])
        check_start(cfg)
        trainer = Trainer(cfg)
        out["parameters"] = sum(p.numel() for p in trainer.pm.parameters())
        trainer.train()
    except Exception:  # noqa: BLE001 - recorded, and the next case still runs
        out["error"] = traceback.format_exc()[-3000:]
        print(out["error"], file=sys.stderr, flush=True)
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gc.collect()
    out["seconds"] = time.monotonic() - t0
    if use_cuda:
        try:  # after a CUDA error (not an out-of-memory) every CUDA call fails: keep what was measured
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            torch.cuda.empty_cache()
        except RuntimeError as e:
            out.setdefault("error", f"CUDA after the case: {e}")
    metrics = Path(case["out_dir"]) / "metrics.jsonl"
    if "error" not in out and metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
        timed = rows[1:] or rows  # the first step pays for kernel selection and FFT plans
        out.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                   step_tokens_per_s=[r["tokens_per_s"] for r in rows], losses=[r["loss"] for r in rows])
        if not all(math.isfinite(x) for x in out["losses"]):
            out["error"] = f"non-finite loss: {out['losses']}"
    return out


def _worker(spec_path: str) -> int:
    """Under torchrun: every case in this one process (the process group is made once; each
    Trainer rebuilds megatron-core's groups), results written after each case."""
    import torch
    import torch.distributed as dist

    from megatron_adapters.groups import destroy_parallel

    spec = json.loads(Path(spec_path).read_text())
    use_cuda = torch.cuda.is_available()
    deadline = time.monotonic() + spec["budget_s"]
    results, longest = [], 0.0

    def rank0_says(flag: bool) -> bool:  # ranks whose clocks disagree would run different cases and hang
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        t = torch.tensor([float(flag)], device="cuda" if use_cuda else "cpu")
        dist.broadcast(t, 0)
        return bool(t.item())

    try:
        for case in spec["cases"]:
            left = deadline - time.monotonic()
            if rank0_says(left < longest or left <= 0):
                results.append({"name": case["name"], "skipped": f"time budget: {max(left, 0):.0f} s left, the "
                                f"longest case so far took {longest:.0f} s"})
            else:
                results.append(_run_case(case, spec["config"], use_cuda))
                longest = max(longest, results[-1]["seconds"])
            if not dist.is_initialized() or dist.get_rank() == 0:
                Path(spec["results"]).write_text(json.dumps(results))
    finally:
        destroy_parallel()
    return 0


# ---------------------------------------------------------------------------- report
def _summarize(cases: list[dict], results: list[dict], peak_tflops: float, nproc: int) -> list[dict]:
    by_name = {r["name"]: r for r in results}
    rows = []
    for c in cases:
        r = by_name.get(c["name"], {"skipped": "not reached (torchrun ended before it)"})
        row = {k: c[k] for k in ("name", "kind", "seq_len", "pattern", "global_batch", "micro_batch", "steps", "precision",
                                 "activation_checkpointing", "train_flops_per_token", "forward_flops_per_token")}
        row.update({k: v for k, v in r.items() if k != "name"})
        if "tokens_per_s" in r and c["train_flops_per_token"]:
            row["model_tflops_per_s"] = r["tokens_per_s"] * c["train_flops_per_token"] / 1e12
            row["mfu"] = mfu(r["tokens_per_s"], c["train_flops_per_token"], peak_tflops, nproc)
        rows.append(row)
    return rows


def _ratios(rows: list[dict]) -> dict:
    tps = {(r["kind"], r["seq_len"]): r.get("tokens_per_s") for r in rows}
    out = {}
    for L in sorted({r["seq_len"] for r in rows}):
        hy, at = tps.get(("hyena", L)), tps.get(("attention-only", L))
        out[str(L)] = hy / at if hy and at else None
    return out


def _length(L) -> str:
    L = int(L)
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def _gib(x) -> str:
    return f"{x / 2**30:.1f}" if x is not None else "-"


def format_report(result: dict) -> str:
    p, lines = result["parity"], []
    lines.append(f"# hyena-glt GPU check: {result['device']}, torch {result['torch']}, {result['nproc']} process(es), "
                 f"{result['mode']}")
    lines.append(f"(a) forward parity, tiny {p['model']}, fp32, batch {p['batch']} x {p['seq_len']}, tolerance "
                 f"max|err|/max|ref| <= {p['tolerance']:.0e}")
    lines.append(f"    CPU twice: {'bitwise equal' if p['cpu_repeat_bitwise_equal'] else 'DIFFERENT'}; CPU fp32 vs fp64: "
                 f"{p['cpu_fp32_vs_fp64']:.2e}")
    if "cuda_vs_cpu" in p:
        lines.append(f"    CUDA vs CPU: {p['cuda_vs_cpu']:.2e} (loss {p['cuda_loss_rel_diff']:.2e}); CUDA vs fp64: "
                     f"{p['cuda_vs_fp64']:.2e}")
    else:
        lines.append("    CUDA vs CPU: skipped (no CUDA device)")
    lines.append(f"    {'PASS' if p['passed'] else 'FAIL'}")
    t = result["train"]
    lines.append(f"(b) training, {t['config']}: d_model {t['d_model']}, {t['num_layers']} layers, "
                 f"{t['parameters']:,} parameters; MFU vs {t['peak_tflops']:g} TFLOP/s per GPU")
    if t.get("note"):
        lines.append(f"    {t['note']}")
    lines.append(f"    {'case':<22}{'L':>7}{'batch':>6}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"
                 f"{'loss first->last':>20}")
    for r in t["cases"]:
        if "tokens_per_s" in r:
            loss = f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"
            if "mfu" in r:
                digits = 1 if r["mfu"] > 1e-3 else 4
                flops = f"{r['model_tflops_per_s']:>9.{digits}f}{r['mfu']:>7.{max(digits - 1, 1)}%}"
            else:
                flops = f"{'-':>9}{'-':>7}"
            lines.append(f"    {r['name']:<22}{r['seq_len']:>7}{r['global_batch']:>6}{r['tokens_per_s']:>11,.0f}"
                         f"{flops}{_gib(r.get('peak_memory_bytes')):>10}{loss:>20}")
        else:
            why = (r.get("error") or "").strip().splitlines()[-1:] or [r.get("skipped", "no result")]
            lines.append(f"    {r['name']:<22}{r['seq_len']:>7}{r['global_batch']:>6}  {'ERROR' if 'error' in r else 'skipped'}: "
                         f"{why[0][:120]}")
    ratios = ", ".join(f"{_length(L)} {v:.2f}x" if v else f"{_length(L)} -" for L, v in t["hyena_vs_attention"].items())
    lines.append(f"    striped Hyena vs attention-only tokens/s: {ratios}")
    if t.get("error"):
        lines.append(f"    ERROR: {t['error']}")
    lines.append(f"result: {'PASS' if result['passed'] else 'FAIL'} ({result['seconds']:.0f} s)")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from launch.training.config import TrainConfig

    t_start = time.monotonic()
    use_cuda = torch.cuda.is_available()
    out_dir = Path(args.out or os.environ.get("OUT") or "runs/gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible)"
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
    if use_cuda:
        mode = "CUDA"
        config = Path(args.config or GPU_CONFIG).resolve()
        lengths = args.lengths or list(GPU_LENGTHS)
        tokens, steps, precision = args.tokens_per_step or GPU_TOKENS_PER_STEP, args.steps or GPU_STEPS, None
    else:
        mode = "CPU fallback (no CUDA device: the CUDA parity and the bf16 1B runs are skipped)"
        print(f"# bench gpu: no CUDA device: running the CPU fallback ({CPU_CONFIG.name}, fp32, gloo); "
              "the CUDA part is skipped", flush=True)
        config = Path(args.config or CPU_CONFIG).resolve()
        lengths = args.lengths or list(CPU_LENGTHS)
        tokens, steps, precision = args.tokens_per_step or CPU_TOKENS_PER_STEP, args.steps or CPU_STEPS, "fp32"
    print("# (a) forward parity", flush=True)
    parity = forward_check(use_cuda)
    model_cfg = TrainConfig.load(config).model
    with torch.device("meta"):  # count without allocating
        from hyena_glt import build_causal_lm

        n_params = build_causal_lm(model_cfg, initialize=False).num_parameters()
    train = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
             "d_model": model_cfg.d_model, "num_layers": model_cfg.num_layers, "parameters": n_params,
             "peak_tflops": args.peak_tflops, "tokens_per_step": tokens, "hyena_vs_attention": {}}
    if not use_cuda:
        train["note"] = (f"CPU: tokens/s and MFU (against the GPU peak) only exercise the code path; "
                         f"the CUDA run measures {GPU_CONFIG.name} at {', '.join(map(str, GPU_LENGTHS))}")
    print(f"# (b) training: {config.name}, lengths {lengths}, {tokens} tokens/step, {steps} steps", flush=True)
    # Validated, and listed should the pack fail, before anything runs; planned again on the pack.
    cases = plan_cases(config, lengths, tokens, steps, Path("packed"), Path("runs"), args.set, precision, args.nproc)
    results, error = [], None
    with tempfile.TemporaryDirectory(prefix="hyena-glt-gpu-check-") as tmp:
        work = Path(tmp)
        try:
            pack = _pack(GENOME if use_cuda else CPU_GENOME, max(lengths), work)
        except subprocess.CalledProcessError as e:
            error = f"pack failed: {' '.join(e.stderr.split()[-40:])}"
        else:
            cases = plan_cases(config, lengths, tokens, steps, pack, work, args.set, precision, args.nproc)
            left = args.time_budget - (time.monotonic() - t_start)
            spec = {"config": str(config), "cases": cases, "budget_s": max(left - 15, 1.0)}  # 15 s: worker start-up
            results, error = _launch(spec, work, args.nproc, timeout=max(left, 1.0) + 60)
    train["cases"] = _summarize(cases, results, args.peak_tflops, args.nproc)
    train["hyena_vs_attention"] = _ratios(train["cases"])
    if error:
        train["error"] = error
    errors = [r["name"] for r in train["cases"] if "error" in r]
    result = {"bench": "gpu", "mode": mode, "device": device, "cuda": use_cuda, "torch": torch.__version__,
              "cuda_version": torch.version.cuda, "nproc": args.nproc, "parity": parity, "train": train,
              "passed": bool(parity["passed"] and not errors and not error and results),
              "seconds": time.monotonic() - t_start}
    report = format_report(result)
    (out_dir / RESULT_JSON).write_text(json.dumps(result, indent=2))
    (out_dir / RESULT_TXT).write_text(report + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print("\n" + report)
    print(f"wrote {out_dir / RESULT_JSON} and {out_dir / RESULT_TXT}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":  # the torchrun worker: python -m launch.bench.gpu SPEC.json
    sys.exit(_worker(sys.argv[1]))
