"""The fine-tuning loop behind `hyena-glt finetune`, one task or several: data parallel and resumable.

Steps: each step trains one task's global batch of `--batch-size` sequences (the task drawn
by weight with TaskSampler for multi-task). An epoch is as many steps as all tasks' training
batches together; within a task, each pass over its examples is a fresh permutation.

The same training contract as pretraining (launch/training/trainer.py), through the same pieces:

* process groups: megatron_adapters.groups.initialize_parallel with a data-parallel-only
  layout (`start_data_parallel`: one process, or torchrun's WORLD_SIZE);
* the step: the model wrapped in replicated.ReplicatedModel and optimizer.PlainOptimizer.
  Rank r takes sequences r, r+W, ... of every global batch; the label count (the loss
  denominator) is all-reduced first, each rank back-propagates its loss sum divided by it and
  gradients are summed over ranks (grads.allreduce_coalesced), so every update equals one
  process on the whole batch (tests/training/test_finetune.py). Parameters the step's task does not reach
  (the other tasks' heads) keep grad None and AdamW leaves them alone. The global grad norm is
  clipped to 1; AdamW from optimizer.build_adamw, LR from optimizer.lr_at (10% warmup, cosine to 0.1x);
* checkpoints: launch/checkpoint/ (`OUT/checkpoint/step_N/`, every `--save-every` steps and
  at each epoch end): model and Adam states as safetensors keyed by parameter name, every
  rank's RNG and the task batch generators as safetensors, step, batch orders, the epoch's
  metrics so far and the settings fingerprint in meta.json. No pickle.

The output directory `--out` (launch/checkpoint/publish.py): rank 0 holds its lock
(`OUT.LOCK`) for the whole run; a non-empty OUT is refused unless it holds this command's own
files and `--resume` is given, or `--replace`. The final model (config.json, model.safetensors,
checksums.json, head.json or tasks.json, finetune_metrics.json) is written into
`OUT.partial-XXXXXXXX` and swapped into place whole; the run's checkpoint moves into it.

`--resume` continues from the latest checkpoint and gives the same steps as an uninterrupted
run on the same number of processes (a resume with other settings is refused, naming them);
`--exit-after-steps N` saves and exits (wall-time-limited jobs). Validation is split over
the ranks the same way and gathered (MultiTaskMetrics). Only rank 0 prints and saves the model.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hyena_glt.multitask import MultiTaskMetrics, TaskSampler
from hyena_glt.params import param_seed
from launch.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    read_state_tensors,
    save_checkpoint,
    write_json,
)
from launch.finetune.data import collate, fmt_metrics
from launch.training.metrics import progress
from launch.training.optimizer import AdamWSettings, PlainOptimizer, lr_at

CHECKPOINT = "checkpoint"
METRICS = "finetune_metrics.json"
GRAD_CLIP = 1.0



def new_epoch_stats() -> dict:
    """A task's running figures within one epoch (saved in checkpoints to resume mid-epoch)."""
    return {"loss_sum": 0.0, "count": 0.0, "step_losses": [], "step_grad_norms": []}


def epoch_stats_from_meta(saved) -> dict:
    """Stats as a checkpoint holds them; earlier checkpoints kept [loss_sum, count, steps,
    step losses...] and no gradient norms."""
    if isinstance(saved, dict):
        return saved
    return {"loss_sum": saved[0], "count": saved[1], "step_losses": list(saved[3:]), "step_grad_norms": []}

class TaskBatches:
    """Endless batches of one task: a fresh permutation per pass (its own generator); the last
    batch of a pass may be short, so ceil(n / batch_size) batches cover every example once."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size = examples, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list:
        if not self.order:
            self.order = torch.randperm(len(self.examples), generator=self.g).tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.examples[j] for j in batch]

    def load(self, generator_state: torch.Tensor, order: list[int]) -> None:
        self.g.set_state(generator_state)
        self.order = [int(i) for i in order]


@dataclass
class FinetuneJob:
    """What to train: a head model (one task, called model(ids)) or a HyenaGLTMultiTask
    (called model(ids, task=name)), its tasks (name -> TaskSpec) and data (name -> PreparedTask)."""

    model: nn.Module
    tasks: dict
    data: dict
    multi: bool
    fingerprint: dict = field(default_factory=dict)  # settings a resumed run must share


def start_data_parallel(model_config):
    """The pretraining process groups for a data-parallel-only layout -> this rank's RankContext.
    Pair with megatron_adapters.groups.destroy_parallel()."""
    from megatron_adapters.groups import RankContext, initialize_parallel
    from megatron_adapters.parallel_config import ParallelConfig

    return RankContext.current(initialize_parallel(ParallelConfig(), model_config))


class Finetuner:
    def __init__(self, job: FinetuneJob, args, ctx):
        """`ctx`: this rank's RankContext (start_data_parallel)."""
        from megatron_adapters.groups import parallel_device
        from megatron_adapters.replicated import ReplicatedModel

        self.ctx, self.world, self.rank = ctx, ctx.layout.dp, ctx.coords.dp
        if args.batch_size < self.world:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least the number of processes ({self.world})")
        self.job, self.args = job, args
        self.device = parallel_device()
        self.pm = ReplicatedModel(job.model, ctx, self.device)
        self.opt = PlainOptimizer(self.pm, AdamWSettings(args.lr, args.weight_decay, grad_clip=GRAD_CLIP))
        self.steps_per_epoch = sum(-(-len(d.train) // args.batch_size) for d in job.data.values())
        self.total = self.steps_per_epoch * args.epochs
        if args.max_steps:
            self.total = min(self.total, args.max_steps)
        self.sampler = TaskSampler({n: t.weight for n, t in job.tasks.items()}, seed=args.seed)
        self.batches = {n: TaskBatches(d.train, args.batch_size, param_seed(args.seed, f"finetune/{n}"))
                        for n, d in job.data.items()}
        self.step = 0
        self.history: list[dict] = []
        self.epoch_stats: dict[str, list[float]] = {}  # task -> [loss sum, label count, steps, ...step losses]
        self.out = Path(args.out)
        self.output = None  # rank 0: the Publication of --out (open_output)
        self.fingerprint = {**job.fingerprint, "world_size": self.world, "batch_size": args.batch_size,
                            "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "seed": args.seed}
        torch.manual_seed(args.seed + ctx.rank)  # dropout: different per rank, reproducible

    # ------------------------------------------------------------ data parallel
    def share(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctx.dp_cp_group)
        return out

    # ------------------------------------------------------------ one step
    def _batch(self, name: str, examples: list) -> dict:
        ids, labels = collate(examples, self.job.tasks[name].kind)
        return {"input_ids": ids, "labels": labels, **({"task": name} if self.job.multi else {})}

    def train_step(self, name: str) -> float:
        """One optimizer step of task `name`; its loss and gradient norm join the epoch's stats."""
        local = self.share(self.batches[name].next())
        micro = [self._batch(name, local)] if local else []  # (a rank may have none at a pass's end)
        loss_sum, count, grad_norm, _ = self.opt.step(micro, contextlib.nullcontext)
        loss = loss_sum / max(count, 1.0)
        stats = self.epoch_stats.setdefault(name, new_epoch_stats())
        stats["loss_sum"] += loss_sum
        stats["count"] += count
        stats["step_losses"].append(loss)
        stats["step_grad_norms"].append(grad_norm)
        return loss

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, name: str) -> dict:
        """Each rank evaluates its share of the validation examples; metrics on all of them."""
        spec, model = self.job.tasks[name], self.job.model
        mine = MultiTaskMetrics({name: spec})
        examples = self.share(self.job.data[name].val)
        model.eval()
        for i in range(0, len(examples), self.args.batch_size):
            mb = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                  for k, v in self._batch(name, examples[i : i + self.args.batch_size]).items()}
            out = model(**mb)
            mine.update(name, out.logits, mb["labels"], out.loss_sum, out.weight_sum)
        model.train()
        merged = MultiTaskMetrics({name: spec})
        for part in self.gather(mine):
            merged.merge(part)
        return merged.compute()[name]

    def end_of_epoch(self, say) -> None:
        epoch = -(-self.step // self.steps_per_epoch)
        record = {"epoch": epoch, "step": self.step, "tasks": {}}
        say(f"epoch {epoch}  step {self.step}/{self.total}")
        for name, spec in self.job.tasks.items():
            s = self.epoch_stats.get(name)
            r = record["tasks"][name] = {}
            line = f"  {name}: no steps this epoch"
            if s:
                r.update(train_loss=s["loss_sum"] / max(s["count"], 1.0), train_steps=len(s["step_losses"]),
                         step_losses=s["step_losses"], step_grad_norms=s["step_grad_norms"])
                line = f"  {name}: train_loss {r['train_loss']:.4f} ({r['train_steps']} steps)"
            if self.job.data[name].val:
                r["val"] = self.validate(name)
                line += "  val " + fmt_metrics(r["val"], spec.kind)
            say(line)
        self.history.append(record)
        self.epoch_stats = {}

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> None:
        meta = {
            "layout": {"tp": 1, "cp": 1, "pp": 1, "sp": False, "dp": self.world, "world_size": dist.get_world_size(),
                       "zero_stage": 0},
            "model_config": self.job.model.config.to_dict(),
            "fingerprint": self.fingerprint,
            "history": self.history,
            "epoch_stats": self.epoch_stats,
            "batch_orders": {n: b.order for n, b in self.batches.items()},
        }
        generators = {f"batches/{n}": b.g.get_state() for n, b in self.batches.items()}
        save_checkpoint(self.checkpoint_dir, self.step, self.pm, self.opt, meta, keep=1, tensors=generators)

    def load_checkpoint(self) -> bool:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            if (self.checkpoint_dir / "state.pt").is_file():
                raise ValueError(f"--resume: {self.checkpoint_dir} holds a checkpoint of an older format (pickle), "
                                 "which is not loaded; start again with another --out")
            return False
        saved = read_meta(path).get("fingerprint", {})
        mine = json.loads(json.dumps(self.fingerprint))  # as it reads back from meta.json
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"--resume: {path} was written with other settings ({', '.join(diff)}); "
                             "use the same command, or another --out")
        meta = load_checkpoint(path, self.pm, self.opt)
        generators = read_state_tensors(path)
        for n, b in self.batches.items():
            b.load(generators[f"batches/{n}"], meta["batch_orders"][n])
        self.step, self.history = meta["step"], meta["history"]
        self.epoch_stats = {n: epoch_stats_from_meta(v) for n, v in meta["epoch_stats"].items()}
        return True

    # ------------------------------------------------------------ the output directory
    def open_output(self) -> None:
        """Rank 0 locks --out (`OUT.LOCK`, launch/checkpoint/publish.py) for the whole run, clears
        what an interrupted run left beside it, and checks what it holds: empty or absent; with
        --resume, what finetune writes (its checkpoint, a model); with --replace, anything (the
        old model stays until the new one is published; an old checkpoint is removed unless
        --resume). Anything else is refused in one line. Collective: every rank raises it."""
        from launch.checkpoint import CheckpointError, Publication

        error = None
        if self.ctx.rank == 0:
            try:
                self.output = Publication([self.out], command="finetune", replace=True, carry=(CHECKPOINT,)).acquire()
                self._check_output()
            except (OSError, ValueError) as e:
                self.close_output()
                error = " ".join(str(e).split())
        if dist.get_world_size() > 1:
            agreed = [error]
            dist.broadcast_object_list(agreed, src=0)
            error = agreed[0]
        if error:
            raise CheckpointError(error)

    def _check_output(self) -> None:
        from hyena_glt.checksums import CHECKSUMS_NAME
        from hyena_glt.heads import HEAD_NAME, TASKS_NAME
        from hyena_glt.model import CONFIG_NAME, WEIGHTS_NAME
        from launch.checkpoint import CheckpointError
        from launch.checkpoint.publish import is_empty, remove

        out, args = self.out, self.args
        replace, resume = getattr(args, "replace", False), getattr(args, "resume", False)
        if is_empty(out):
            return
        if not out.is_dir() or out.is_symlink():
            raise CheckpointError(f"finetune: --out {out} exists and is not a directory; give another --out")
        held = sorted(p.name for p in out.iterdir())
        if replace:
            if not resume and (out / CHECKPOINT).exists():
                remove(out / CHECKPOINT)  # the replaced run's: this run keeps its own there
                print(f"note: --replace: removed {out / CHECKPOINT} (the checkpoint of the run being replaced; its "
                      "model stays in place until this run publishes its own)", file=sys.stderr, flush=True)
            return
        ours = {CHECKPOINT, CONFIG_NAME, WEIGHTS_NAME, CHECKSUMS_NAME, HEAD_NAME, TASKS_NAME, METRICS}
        foreign = [n for n in held if n not in ours]
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise CheckpointError(f"finetune: --out {out} already exists and is not empty (it holds {shown}, not "
                                  "written by finetune); give --replace to replace it (swapped in whole once the new "
                                  "model is complete), or another --out")
        if resume:
            return
        what = "a fine-tuned model" if CONFIG_NAME in held else "the checkpoint of an unfinished run"
        raise CheckpointError(f"finetune: --out {out} already exists and is not empty (it holds {what}); give "
                              "--resume to continue that run, --replace to replace it (swapped in whole once the new "
                              "model is complete), or another --out")

    def publish(self, history: list[dict]) -> None:
        """Rank 0: the model and its metrics written into `OUT.partial-XXXXXXXX`, then swapped into
        place whole; the run's checkpoint moves over into the new OUT."""
        (tmp,) = self.output.start()
        try:
            self.job.model.save_pretrained(tmp)
            write_json(tmp / METRICS, history)
            self.output.commit()
        except OSError as e:  # a full disk: one line naming the file; OUT as it was
            self.output.abort()
            raise self.output.failed(e) from None
        except BaseException:
            self.output.abort()
            raise

    def close_output(self) -> None:
        output, self.output = getattr(self, "output", None), None
        if output is not None:
            output.close()

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self.open_output()
        try:
            return self._run()
        finally:
            self.close_output()

    def _run(self) -> int:
        args, is_logger = self.args, self.ctx.rank == 0
        say = partial(print, flush=True) if is_logger else (lambda *_: None)
        if args.resume and self.load_checkpoint():
            say(f"resumed from {self.checkpoint_dir} at step {self.step}")
        bar = progress(self.total, self.step, is_logger, "finetune")
        if bar is not None:
            say = bar.write
        t0, ran = time.perf_counter(), 0
        self.pm.train()
        while self.step < self.total:
            self.step += 1
            ran += 1
            self.opt.set_lr(lr_at(self.step, args.lr, max(1, self.total // 10), self.total, 0.1))
            name = self.sampler.sample(self.step)
            loss = self.train_step(name)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task=name, loss=f"{loss:.4f}")
            epoch_end = self.step % self.steps_per_epoch == 0 or self.step == self.total
            if epoch_end:
                self.end_of_epoch(say)
            if epoch_end or (args.save_every and self.step % args.save_every == 0):
                self.save_checkpoint()
            if args.exit_after_steps and ran >= args.exit_after_steps and self.step < self.total:
                self.save_checkpoint()
                say(f"exit after {ran} steps (step {self.step}/{self.total}); continue with --resume")
                if bar is not None:
                    bar.close()
                return 0
        if bar is not None:
            bar.close()
        if is_logger:
            history = [{**r, "seconds": round(time.perf_counter() - t0, 3)} if i == len(self.history) - 1 else r
                       for i, r in enumerate(self.history)]
            self.publish(history)
            say(f"saved the fine-tuned model to {self.out}")
        dist.barrier()
        return 0
