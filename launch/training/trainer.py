"""`hyena-glt train`: one trainer for one process, torchrun, the deepspeed launcher and SLURM.

Per step: the loader hands this data-parallel rank its micro-batches of the global batch;
`ParallelModel.forward_backward` runs them through the layout (TP/SP/CP/PP) and returns
the global token-weighted (loss_sum, weight_sum); the optimizer (plain AdamW or DeepSpeed
ZeRO) steps. The logged loss is loss_sum / weight_sum over the whole global batch, so the
same data and seed give the same per-step losses under every layout. With `tasks:` the
step also trains task heads on the same backbone (launch/training/cotrain.py, megatron_adapters/
task_heads.py): the logged loss is then the objective, the LM's mean plus each task's mean
times its weight, and its parts are logged beside it.

Before any process group is made, check_start checks what the run will need (the packs, the
task files, the output and checkpoint dirs, the free disk for one checkpoint). Rank 0 then locks
checkpoint.dir (launch/checkpoint/ DirLock) until the run ends, removes what interrupted
saves left there and resumes from the newest intact checkpoint (verified; damaged newer ones
are set aside and reported). The final checkpoint is saved before the final evaluation.
Problems every rank agrees on are reported by rank 0 alone (one line); the others exit 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launch.checkpoint.io import oneline
from launch.training.config import TrainConfig, resume_differences
from launch.training.cotrain import (
    TaskBatches,
    check_resume,
    evaluate_tasks,
    load_tasks,
    step_record,
    task_meta,
)
from launch.training.curriculum import apply_curriculum, seq_len_at
from launch.training.metrics import LN2, MetricsLog, progress
from launch.training.optimizer import lr_at
from launch.training.startup import check_start
from launch.training.watchdog import PeerWatchdog, describe_hosts, gather_hosts


class TrainingStopped(RuntimeError):
    pass


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (what SLURM and preemptible schedulers send) set a flag; the trainer
    checks it between steps, agrees on it across ranks, saves and exits cleanly.

    A rank blocked in a collective whose peer is gone never gets to that check: torchrun's
    agent sends SIGTERM to the survivors of a failed rank and waits 30 s before SIGKILL. So
    when the step in progress has not ended `grace` seconds after the signal (3 step times,
    at least MIN_GRACE_S), the rank exits at once with 128 + the signal, without a checkpoint
    (its peers could not have joined one), and a restart begins without the wait."""

    MIN_GRACE_S = 10.0

    def __init__(self):
        self.signum = None
        self.step_seconds = 0.0  # the trainer's last step time
        self._timer: threading.Timer | None = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self._cancel()

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            grace = max(self.MIN_GRACE_S, 3 * self.step_seconds)
            self._timer = threading.Timer(grace, self._stuck, args=(signum, grace))
            self._timer.daemon = True
            self._timer.start()

    @staticmethod
    def _stuck(signum: int, grace: float) -> None:
        print(f"hyena-glt train: signal {signum} received {grace:.0f} s ago and the step in progress has not ended "
              "(a peer rank is gone): exiting without a checkpoint; a restart resumes from the last one",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop:  # every rank got here: the save that follows has its peers
            self._cancel()
        return stop


def _autocast_factory(precision: str, device: torch.device):
    if precision == "bf16":
        # fp32 master weights; matmuls in bf16. FFT convolutions upcast to fp32 themselves.
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None, tasks: dict | None = None):
        """`tasks`: cfg.tasks as cotrain.load_tasks read them (read here when not given)."""
        from launch.checkpoint import DirLock
        from launch.training.optimizer import build_optimizer
        from megatron_adapters.build import build_parallel_model
        from megatron_adapters.groups import RankContext, initialize_parallel

        self.cfg = cfg
        t = cfg.train
        # Every layout and batch rule before any process group: the check `train --dry-run` runs.
        cfg.layout_for(dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
        self.layout = initialize_parallel(cfg.parallel_config(), cfg.model, seq_length=t.seq_len)
        self.ctx = RankContext.current(self.layout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_logger = self.rank == 0
        self._log = log or print
        self.lock = None
        self.watchdog = None
        if self.world > 1:  # first: a rank lost during minutes of start-up must not hang the others
            self.hosts = gather_hosts()
            self.log(self._hosts_line())
            self.watchdog = PeerWatchdog.start(t.peer_timeout_s, self.hosts)
        # Now, not when training starts: a scheduler's signal during minutes of start-up must
        # save-and-exit at the first step, not kill the rank (SLURM's default action).
        self.preempt = _PreemptionFlag()
        self.step = 0
        self.saved_step = None  # the step of the newest checkpoint of this run (saved or resumed from)
        self.tasks = tasks if tasks is not None else (load_tasks(cfg) if cfg.tasks else None)
        try:
            if cfg.checkpoint.dir:  # first, before minutes of model building: a second run is refused at once
                self.lock = self._on_rank0(lambda: DirLock(cfg.checkpoint.dir).acquire(self.log), share=False)
            torch.manual_seed(t.seed + self.rank)
            self.pm = build_parallel_model(cfg.model, self.layout)
            if self.tasks:
                from megatron_adapters.task_heads import TaskHeadsModel

                self.pm = TaskHeadsModel(self.pm, {n: task.spec for n, task in self.tasks.items()})
                self.task_batches = TaskBatches(self.tasks, t.seq_len, t.micro_batch_size, self.ctx.coords.dp,
                                                self.layout.dp, t.seed)
            self.pm.set_activation_checkpointing(t.activation_checkpointing)
            self.opt = build_optimizer(self.pm, cfg)
            self.autocast = _autocast_factory(t.precision, self.pm.device)
            self.loader = self._loader(cfg.data.train, "train")
        except BaseException as e:
            if self.watchdog is not None and isinstance(e, Exception):
                self.watchdog.failed(e)
            self.close()
            raise
        self.tokens = 0
        self.nonfinite_in_a_row = 0

    def log(self, msg: str) -> None:
        if self.is_logger:
            self._log(msg)

    def _hosts_line(self) -> str:
        """Which host holds which ranks, and whether every tensor-parallel group is within one
        host (its all-reduces, every layer, must not cross the network). Collective."""
        line = f"hosts: {describe_hosts(self.hosts)}"
        if self.layout.parallel.tp == 1:
            return line
        mine = dist.get_process_group_ranks(self.ctx.tp_group)
        groups = [None] * self.world
        dist.all_gather_object(groups, (mine, sorted({self.hosts[r] for r in mine})))
        spanning = sorted({(tuple(r), tuple(h)) for r, h in groups if len(h) > 1})
        if not spanning:
            return f"{line}; every tensor-parallel group within one host"
        worst = spanning[0]
        return (f"{line}; warning: {len(spanning)} tensor-parallel group(s) span hosts (ranks "
                f"{','.join(map(str, worst[0]))} on {', '.join(worst[1])}): their all-reduces cross the network every "
                f"layer; start a multiple of parallel.tp={self.layout.parallel.tp} ranks per host")

    def close(self) -> None:
        """Release the checkpoint dir and the signal handlers (idempotent; every exit path)."""
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.preempt is not None:
            self.preempt.restore()
            self.preempt = None

    def _fail(self, error: Exception):
        """An error every rank has reached the same way. One process: raised (the CLI prints one
        line). Several: rank 0 prints the one line itself, and only then (a barrier) every rank
        exits 2, so that the launcher stopping the others cannot swallow the message."""
        if self.world == 1 or (self.rank == 0 and os.environ.get("HYENA_GLT_DEBUG")):
            raise error
        if self.rank == 0:
            print(f"hyena-glt train: error: {oneline(error)}", file=sys.stderr, flush=True)
        self.close()  # the lock goes now: the launcher may SIGTERM this rank once another one exits
        with contextlib.suppress(Exception):
            dist.barrier()
        raise SystemExit(2)

    def _on_rank0(self, fn, share: bool = True):
        """fn() on rank 0 (file-system work on checkpoint.dir); its result on every rank (None on
        the others unless `share`), or its error reported once (see _fail)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - reported through _fail below
                error = e
        if self.world > 1:
            shared = [None if error is None else oneline(error), result if share else None]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None:
                from launch.checkpoint import CheckpointError

                self._fail(error if error is not None else CheckpointError(shared[0]))
            if self.rank != 0:
                result = shared[1]
        elif error is not None:
            raise error
        return result

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
        return {
            "layout": self.cfg.layout_record(self.layout.dp, self.world),
            "model_config": self.cfg.model.to_dict(),
            "train_config": self.cfg.dump(),
            "loader": self.loader.state_dict(),
            "tokens": self.tokens,
            **(task_meta(self.tasks) if self.tasks else {}),
        }

    def save(self) -> Path | None:
        """Save a checkpoint of this step (once: a second call at the same step does nothing)."""
        from launch.checkpoint import CheckpointError, save_checkpoint

        c = self.cfg.checkpoint
        if not c.dir or self.saved_step == self.step:
            return None
        try:
            path = save_checkpoint(c.dir, self.step, self.pm, self.opt, self._meta(), c.keep)
        except CheckpointError as e:  # every rank raises the same one
            self._fail(e)
        self.saved_step = self.step
        self.log(f"saved checkpoint {path}")
        return path

    def _tidy_checkpoint_dir(self) -> list[str]:
        """Rank 0, under the lock: remove what interrupted saves left; refuse resume=false into a
        dir that holds checkpoints. Returns the checkpoint folder names, newest first."""
        from launch.checkpoint import (
            CheckpointError,
            remove_stale_temporaries,
            step_dirs,
        )

        c = self.cfg.checkpoint
        root = Path(c.dir)
        removed = remove_stale_temporaries(root)
        if removed:
            self.log(f"removed what interrupted saves left in {root}: {', '.join(removed)}")
        dirs = step_dirs(root)
        pointer = root / "latest"
        if c.resume and not dirs and pointer.is_file():
            self.log(f"{pointer} names {pointer.read_text().strip()}, but {root} holds no step_* folder: starting from "
                     "step 0")
        if not c.resume:
            held = [p.name for p in dirs] or sorted(p.name for p in root.glob("step_*"))
            if held:
                raise CheckpointError(
                    f"checkpoint.resume=false, but checkpoint.dir {root} already holds checkpoints ({held[0]}"
                    f"{f' .. {held[-1]}' if len(held) > 1 else ''}); nothing was changed: use another checkpoint.dir, "
                    "or checkpoint.resume=true to continue from them")
        return [p.name for p in reversed(dirs)]

    def maybe_resume(self) -> None:
        """Resume from the newest intact checkpoint of checkpoint.dir (collective). Checkpoints
        are verified (sizes and sha256 recorded in meta.json; the hashing is shared by the
        ranks); newer damaged ones are set aside as step_N.damaged and reported in one line."""
        from launch.checkpoint import (
            CheckpointError,
            Problem,
            check_checkpoint,
            damage_report,
            find_intact,
            load_checkpoint,
            missing_optimizer_files,
            read_meta,
            set_aside,
        )

        c = self.cfg.checkpoint
        if not c.dir:
            return
        root = Path(c.dir)
        names = self._on_rank0(self._tidy_checkpoint_dir)
        if not c.resume or not names:
            return

        def check(path: Path):
            problems = [q for q in check_checkpoint(path, part=(self.rank, self.world))
                        # optimizer states: not read with fresh_optimizer; a missing one is its own error below
                        if not (q.file.name.startswith("optim-") and (c.fresh_optimizer or q.kind == "missing"))]
            if self.world > 1:
                every = [None] * self.world
                dist.all_gather_object(every, [(str(q.file), q.reason, q.kind) for q in problems])
                seen = {}
                for part in every:
                    for f, reason, kind in part:
                        seen.setdefault((f, reason), kind)
                problems = [Problem(Path(f), r, k) for (f, r), k in seen.items()]
            return problems

        path, damaged = find_intact([root / n for n in names], check)
        if path is None:
            self._fail(CheckpointError(
                f"no intact checkpoint to resume from in checkpoint.dir {root}: {damage_report(damaged)}; nothing was "
                "changed: move the damaged step_* folders elsewhere to start again, or use another checkpoint.dir"))
        if damaged:
            moved = self._on_rank0(lambda: [set_aside(p).name for p, _ in damaged])
            self.log(f"{damage_report(damaged)}: resuming from {path.name}, the newest intact checkpoint (the damaged "
                     f"one{'s' if len(damaged) > 1 else ''} set aside as {', '.join(moved)})")
        elif self.is_logger:
            pointer = root / "latest"
            named = pointer.read_text().strip() if pointer.is_file() else None
            if named != path.name:
                self.log(f"{pointer} {f'names {named}' if named else 'is missing'}: resuming from {path.name}, the "
                         "newest intact checkpoint")
        missing = missing_optimizer_files(path)
        if missing and not c.fresh_optimizer:
            self._fail(CheckpointError(
                f"{missing[0]}: missing, so the optimizer state of {path.name} cannot be restored; set "
                "checkpoint.fresh_optimizer=true to resume from its weights with fresh optimizer state"))
        saved = read_meta(path)
        changed = resume_differences(saved.get("train_config") or {}, self.cfg.dump())
        if changed:
            key, old, new = changed[0]
            more = f" (and {len(changed) - 1} more: {', '.join(k for k, _, _ in changed[1:4])})" if len(changed) > 1 else ""
            self._fail(ValueError(
                f"{path}: this run changes {key} from {old!r} to {new!r}{more}; a resumed run may change only how long "
                "it runs, its learning-rate schedule, validation, logging, saving and layout (docs/checkpoints.md): "
                f"set {key}={json.dumps(old)} to resume, or start a new checkpoint.dir (train.init_from=<a converted "
                "model> keeps the weights)"))
        try:  # before loading: a checkpoint without this run's heads would fail on a missing tensor
            check_resume(saved, self.tasks or {}, str(path))
        except ValueError as e:
            self._fail(e)
        meta = load_checkpoint(path, self.pm, self.opt, optimizer=not c.fresh_optimizer, verified=True)
        if meta["model_config"] != self.cfg.model.to_dict():
            self._fail(ValueError(f"{path}: the checkpoint's model config differs from this run's model section"))
        self.loader.load_state_dict(meta["loader"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.saved_step = self.step
        old = meta["layout"]
        self.log(f"resumed from {path} at step {self.step} (written by tp={old['tp']} cp={old['cp']} pp={old['pp']} "
                 f"vpp={old.get('vpp', 1)} dp={old['dp']} zero={old['zero_stage']})")
        if c.fresh_optimizer:
            self.log("checkpoint.fresh_optimizer=true: the optimizer state starts fresh (Adam moments from zero); "
                     "set it back to false for later resumes")

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The LM's validation loss, and each task's validation metrics (collective)."""
        out = self._evaluate_lm()
        if self.tasks:
            out.update(evaluate_tasks(self.pm, self.task_batches, self.autocast))
        return out

    def _eval_line(self, r: dict) -> str:
        lm = f"val_loss {r['val_loss']:.4f}  val bits/base {r['val_bits_per_base']:.3f}" if "val_loss" in r else ""
        tasks = "  ".join(f"{k.removeprefix('task/')} {v:.4f}" for k, v in r.items()
                          if k.startswith("task/") and not k.endswith("_n"))
        return "  ".join(x for x in (lm, tasks) if x)

    @torch.no_grad()
    def _evaluate_lm(self) -> dict:
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
        if t.init_from and self.step == 0:  # a warm start (a resumed run continues its own checkpoint)
            from launch.training.warm_start import load_initial_weights

            fresh = self.pm.initial_head_state() if self.tasks else None  # heads the directory may not hold
            changed = load_initial_weights(t.init_from, self.pm, self.opt, cfg.model, fresh=fresh)
            self.log(f"initialised from {t.init_from} (fresh optimizer state)"
                     + (f"; changed: {', '.join(f'{k} {v}' for k, v in changed.items())}" if changed else ""))
        out_dir = Path(cfg.out_dir)
        # A resumed run redoes the steps after its checkpoint (and a final evaluation at its step).
        metrics = MetricsLog(out_dir, enabled=self.is_logger, tensorboard=t.tensorboard,
                             resume_step=self.step if self.step > 0 else None, keep_evals_at_step=self.step < t.steps)
        if metrics.dropped:
            self.log(f"{metrics.path}: dropped {metrics.dropped} line(s) logged after the checkpoint of step {self.step} "
                     "(the resumed run redoes them)")
        if self.is_logger:
            (out_dir / "config.yaml").write_text(json.dumps(cfg.dump(), indent=2))
        preempt = self.preempt = self.preempt or _PreemptionFlag()
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
            n_tok = sum(mb["input_ids"].numel() for mb in micro) * self.layout.dp
            if self.tasks:
                micro = micro + self.task_batches.micro_batches(step)
            t0 = time.perf_counter()
            loss_sum, weight_sum, grad_norm, finite = self.opt.step(micro, self.autocast)
            dt = time.perf_counter() - t0
            preempt.step_seconds = dt
            loss = loss_sum / max(weight_sum, 1e-8)
            self.step, self.tokens = step, self.tokens + n_tok
            last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                    "tokens_per_s": n_tok / dt}
            if t.curriculum.enabled:
                last["seq_len"] = seq_len
            lm_loss = loss
            if self.tasks:
                last.update(step_record(self.pm.last_losses))
                lm_loss = last["lm_loss"]
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
                bar.set_postfix(loss=f"{loss:.4f}", bpb=f"{lm_loss / LN2:.3f}")
            elif self.is_logger and (step % t.log_every == 0 or step == 1):
                tasks = self.pm.last_losses.items() if self.tasks else ()
                parts = "".join(f"  {n} {v:.4f}" for n, v in tasks if n != "lm")
                self.log(f"step {step:>6}/{t.steps}  loss {loss:.4f}  bits/base {lm_loss / LN2:.3f}{parts}  "
                         f"lr {lr:.2e}  grad_norm {grad_norm:.3f}  {last['tokens_per_s']:.0f} tok/s")
            if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                self.save()
                metrics.close()
                raise TrainingStopped(f"{self.nonfinite_in_a_row} non-finite losses in a row at step {step}; "
                                      f"saved a checkpoint and stopped (see train.max_nonfinite_steps)")
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                r = self.evaluate()
                if r:
                    metrics.write({"step": step, **r})
                    self.log(f"step {step:>6}  {self._eval_line(r)}")
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
        self.save()  # before the final evaluation: an evaluation that fails loses no steps
        final = self.evaluate()
        if final:
            metrics.write({"step": self.step, **final})
            self.log(f"final: {self._eval_line(final)}")
        metrics.close()
        return {**last, **final}


def run_train(config_path: str, overrides: list[str]) -> int:
    from megatron_adapters.groups import destroy_parallel

    cfg = TrainConfig.load(config_path, overrides)
    tasks = check_start(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, tasks=tasks)
        trainer.train()
    except TrainingStopped as e:
        print(f"hyena-glt train: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        if trainer is not None and trainer.watchdog is not None:
            trainer.watchdog.failed(e)  # a lost peer: named by the watchdog; this rank's own error: told to the others
        raise
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
    return 0


if __name__ == "__main__":  # `python -m launch.training.trainer --config ...` (what the launchers run)
    from launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
