"""`hyena-glt train`: one trainer for one process, torchrun, the deepspeed launcher and SLURM.

Per step: the loader hands this data-parallel rank its micro-batches of the global batch;
`ParallelModel.forward_backward` runs them through the layout (TP/SP/CP/PP) and returns
the global token-weighted (loss_sum, weight_sum); the optimizer (plain AdamW or DeepSpeed
ZeRO) steps. The logged loss is loss_sum / weight_sum over the whole global batch, so the
same data and seed give the same per-step losses under every layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hyena_glt.curriculum import apply_curriculum, seq_len_at

from .metrics import LN2, MetricsLog, progress
from .optim import lr_at
from .train_config import TrainConfig


class TrainingStopped(RuntimeError):
    pass


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (what SLURM and preemptible schedulers send) set a flag; the trainer
    checks it between steps, agrees on it across ranks, saves and exits cleanly."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _autocast_factory(precision: str, device: torch.device):
    if precision == "bf16":
        # fp32 master weights; matmuls in bf16. FFT convolutions upcast to fp32 themselves.
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        from megatron_adapters.groups import RankContext, initialize_parallel
        from megatron_adapters.parallel_config import ParallelConfig

        from .optimizer_step import build_optimizer

        self.cfg = cfg
        p, t = cfg.parallel, cfg.train
        pcfg = ParallelConfig(tp=p.tp, cp=p.cp, pp=p.pp, sp=p.sp)
        if cfg.model.patching != "none":  # (the layout check below rejects cp, pp and sp)
            if cfg.zero.stage == 3:
                raise ValueError("zero.stage=3 is not supported with token merging; use zero.stage 0, 1 or 2")
        self.layout = initialize_parallel(pcfg, cfg.model, seq_length=t.seq_len)
        self.ctx = RankContext.current(self.layout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_logger = self.rank == 0
        self._log = log or print
        torch.manual_seed(t.seed + self.rank)
        self.pm = build_model(cfg.model, self.layout)
        self.pm.set_activation_checkpointing(t.activation_checkpointing)
        self.opt = build_optimizer(self.pm, cfg)
        self.autocast = _autocast_factory(t.precision, self.pm.device)
        self.loader = self._loader(cfg.data.train, "train")
        self.step = 0
        self.tokens = 0
        self.nonfinite_in_a_row = 0

    def log(self, msg: str) -> None:
        if self.is_logger:
            self._log(msg)

    def _loader(self, data, split):
        from data_tools.loader import GlobalBatchLoader

        t = self.cfg.train
        return GlobalBatchLoader(
            data, split=split, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.ctx.coords.dp, dp_size=self.layout.dp, seed=t.seed,
            reverse_complement_prob=t.reverse_complement_prob if split == "train" else 0.0,
            soft_mask_weight=t.soft_mask_weight,
        )

    # ---------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        p = self.cfg.parallel
        return {
            "layout": {"tp": p.tp, "cp": p.cp, "pp": p.pp, "sp": p.sp, "dp": self.layout.dp, "world_size": self.world,
                       "zero_stage": self.cfg.zero.stage},
            "model_config": self.cfg.model.to_dict(),
            "train_config": self.cfg.dump(),
            "loader": self.loader.state_dict(),
            "tokens": self.tokens,
        }

    def save(self) -> Path | None:
        from .checkpoint import save_checkpoint

        c = self.cfg.checkpoint
        if not c.dir:
            return None
        path = save_checkpoint(c.dir, self.step, self.pm, self.opt, self._meta(), c.keep)
        self.log(f"saved checkpoint {path}")
        return path

    def maybe_resume(self) -> None:
        from .checkpoint import latest_checkpoint, load_checkpoint

        c = self.cfg.checkpoint
        if not c.dir or not c.resume:
            return
        path = latest_checkpoint(c.dir)
        if path is None:
            return
        meta = load_checkpoint(path, self.pm, self.opt)
        if meta["model_config"] != self.cfg.model.to_dict():
            raise ValueError(f"{path}: the checkpoint's model config differs from this run's model section")
        self.loader.load_state_dict(meta["loader"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        old = meta["layout"]
        self.log(f"resumed from {path} at step {self.step} (written by tp={old['tp']} cp={old['cp']} pp={old['pp']} "
                 f"dp={old['dp']} zero={old['zero_stage']})")

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted loss over the first `eval_batches` x micro-batch windows of the val
        split of the first validation pack, the same windows under every layout."""
        from data_tools.loader import eval_batches

        t = self.cfg.train
        if t.eval_batches == 0:
            return {}
        val = self.cfg.data.val or self.cfg.data.train
        first = val if isinstance(val, str) else list(val)[0]
        batches = list(eval_batches(first, t.seq_len, t.micro_batch_size, split="val",
                                    soft_mask_weight=t.soft_mask_weight, max_samples=t.eval_batches * t.micro_batch_size))
        batches = [b for b in batches if b["input_ids"].shape[0] == t.micro_batch_size]
        if not batches:
            return {}
        # Round r: DP rank d evaluates batch r * dp + d; forward_backward sums over DP x CP.
        # A rank with nothing left runs a zero-weight copy so the collectives stay aligned.
        dp, d = self.layout.dp, self.ctx.coords.dp
        loss_sum = weight_sum = 0.0
        for r in range(math.ceil(len(batches) / dp)):
            i = r * dp + d
            if i < len(batches):
                mb = batches[i]
            else:
                mb = {**batches[0], "loss_weights": torch.zeros_like(batches[0]["loss_weights"])}
            with self.autocast():
                ls, ws = self.pm.forward_backward([mb] * self.cfg.parallel.pp, forward_only=True)
            loss_sum, weight_sum = loss_sum + ls.item(), weight_sum + ws.item()
        val_loss = loss_sum / max(weight_sum, 1e-8)
        return {"val_loss": val_loss, "val_bits_per_base": val_loss / LN2}

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        out_dir = Path(cfg.out_dir)
        metrics = MetricsLog(out_dir, enabled=self.is_logger, append=self.step > 0, tensorboard=t.tensorboard)
        if self.is_logger:
            (out_dir / "config.yaml").write_text(json.dumps(cfg.dump(), indent=2))
        preempt = _PreemptionFlag()
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            self.log("warning: torchrun --max-restarts with a shared rendezvous store: a restart can fail to rebuild the "
                     "process groups; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
        self.log(f"layout {self.layout.parallel.describe(self.world)}, zero stage {cfg.zero.stage}, "
                 f"{t.precision}; {t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens")
        bar = progress(t.steps, self.step, self.is_logger, "train")
        last, final = {}, {}
        start_step = self.step
        while self.step < t.steps:
            step = self.step + 1
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
            self.opt.set_lr(lr)
            micro = self.loader.next_global_batch()
            seq_len = seq_len_at(step, t)
            if seq_len < t.seq_len:  # curriculum: the same windows, cut shorter
                micro = [apply_curriculum(mb, seq_len, t.curriculum.mode) for mb in micro]
            t0 = time.perf_counter()
            loss_sum, weight_sum, grad_norm, finite = self.opt.step(micro, self.autocast)
            dt = time.perf_counter() - t0
            loss = loss_sum / max(weight_sum, 1e-8)
            n_tok = sum(mb["input_ids"].numel() for mb in micro) * self.layout.dp
            self.step, self.tokens = step, self.tokens + n_tok
            last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                    "tokens_per_s": n_tok / dt}
            if t.curriculum.enabled:
                last["seq_len"] = seq_len
            if not finite:
                self.nonfinite_in_a_row += 1
                last["skipped"] = True
                self.log(f"step {step}: non-finite loss/gradient ({loss}), step skipped "
                         f"({self.nonfinite_in_a_row}/{t.max_nonfinite_steps} in a row)")
            else:
                self.nonfinite_in_a_row = 0
            metrics.write(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", bpb=f"{loss / LN2:.3f}")
            elif self.is_logger and (step % t.log_every == 0 or step == 1):
                self.log(f"step {step:>6}/{t.steps}  loss {loss:.4f}  bits/base {loss / LN2:.3f}  lr {lr:.2e}  "
                         f"grad_norm {grad_norm:.3f}  {last['tokens_per_s']:.0f} tok/s")
            if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                self.save()
                metrics.close()
                raise TrainingStopped(f"{self.nonfinite_in_a_row} non-finite losses in a row at step {step}; "
                                      f"saved a checkpoint and stopped (see train.max_nonfinite_steps)")
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                r = self.evaluate()
                if r:
                    metrics.write({"step": step, **r})
                    self.log(f"step {step:>6}  val_loss {r['val_loss']:.4f}  val bits/base {r['val_bits_per_base']:.3f}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
                self.save()
            if t.exit_after_steps and step - start_step >= t.exit_after_steps and step < t.steps:
                self.log(f"train.exit_after_steps={t.exit_after_steps} reached: saving at step {step} and exiting")
                self.save()
                metrics.close()
                return {**last, "exited_early": True}
            if preempt.agreed(self.pm.device):
                self.log(f"signal {preempt.signum or 'on another rank'} received: saving at step {step} and exiting")
                self.save()
                metrics.close()
                return {**last, "preempted": True}
        if bar is not None:
            bar.close()
        final = self.evaluate()
        if final:
            metrics.write({"step": self.step, **final})
            self.log(f"final: val_loss {final['val_loss']:.4f}  val bits/base {final['val_bits_per_base']:.3f}")
        self.save()
        metrics.close()
        return {**last, **final}


def build_model(model_cfg, layout):
    """This rank's model for a layout: megatron-core model-parallel chunks, or for token
    merging the U-shape (data x tensor parallel; megatron_adapters/merging.py)."""
    from megatron_adapters.build import build_parallel_model

    return build_parallel_model(model_cfg, layout, dtype=torch.float32)


def run_train(config_path: str, overrides: list[str]) -> int:
    cfg = TrainConfig.load(config_path, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    except TrainingStopped as e:
        print(f"hyena-glt train: {e}", file=sys.stderr)
        return 3
    finally:
        from megatron_adapters.groups import destroy_parallel

        destroy_parallel()
    return 0


if __name__ == "__main__":  # `python -m launch.trainer --config ...` (what the launchers run)
    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
