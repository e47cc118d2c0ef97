"""The fine-tuning loop behind `hyena-glt finetune`, one task or several: data parallel and resumable.

Steps: each step trains one task's global batch of `--batch-size` sequences (the task drawn
by weight with TaskSampler for multi-task). An epoch is as many steps as all tasks' training
batches together; within a task, each pass over its examples is a fresh permutation.

Data parallel (under torchrun): rank r takes sequences r, r+W, ... of every global batch,
back-propagates its loss sum divided by the global label count, and gradients are summed
over ranks, so every update equals one process on the whole batch (tests/test_heads.py).
Validation is split the same way and the predictions gathered. Only rank 0 prints and saves.

Checkpoints (`OUT/checkpoint/`, every `--save-every` steps and at each epoch end): model,
optimizer, step, the task batch iterators, the epoch's metrics so far, and every rank's RNG.
`--resume` continues from it and gives the same steps as an uninterrupted run on the same
number of processes; `--exit-after-steps N` saves and exits (wall-time-limited jobs).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .metrics import progress
from .optim import build_adamw, lr_at

CHECKPOINT = "checkpoint"


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

    def state(self) -> dict:
        return {"generator": self.g.get_state(), "order": list(self.order)}

    def load(self, state: dict) -> None:
        self.g.set_state(state["generator"])
        self.order = list(state["order"])


@dataclass
class FinetuneJob:
    """What to train: a head model (one task, called model(ids)) or a HyenaGLTMultiTask
    (called model(ids, task=name)), its tasks (name -> TaskSpec) and data (name -> PreparedTask)."""

    model: nn.Module
    tasks: dict
    data: dict
    multi: bool
    fingerprint: dict = field(default_factory=dict)  # settings a resumed run must share


class DataParallel:
    """This process's place among the fine-tuning processes (one, or torchrun's WORLD_SIZE)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def share(self, items: list) -> list:
        return items[self.rank :: self.world]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Finetuner:
    def __init__(self, job: FinetuneJob, args, dp: DataParallel):
        from hyena_glt.heads import TaskSampler
        from hyena_glt.params import param_seed

        if args.batch_size < dp.world:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least the number of processes ({dp.world})")
        self.job, self.args, self.dp = job, args, dp
        self.model = job.model.to(dp.device)
        self.opt = build_adamw(self.model, args.lr, args.weight_decay)
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
        self.fingerprint = {**job.fingerprint, "world_size": dp.world, "batch_size": args.batch_size,
                            "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "seed": args.seed}
        torch.manual_seed(args.seed + dp.rank)  # dropout: different per rank, reproducible

    # ------------------------------------------------------------ one step
    def _forward(self, name: str, ids, labels):
        return self.model(ids, task=name, labels=labels) if self.job.multi else self.model(ids, labels=labels)

    def train_step(self, name: str) -> float:
        from .finetune import collate

        kind = self.job.tasks[name].kind
        local = self.dp.share(self.batches[name].next())
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dp.device)
        count = torch.zeros((), dtype=torch.float64, device=self.dp.device)
        out = None
        if local:
            ids, labels = collate(local, kind)
            out = self._forward(name, ids.to(self.dp.device), labels.to(self.dp.device))
            count += out.weight_sum.detach().double()
        self.dp.all_reduce(count)  # the global label count: the loss denominator
        if out is not None:
            (out.loss_sum / count.clamp_min(1.0).to(out.loss_sum.dtype)).backward()
            loss_sum += out.loss_sum.detach().double()
        # Only what this task's loss reaches has a gradient (a rank without examples this step has
        # none): agree on that set, so the other tasks' heads keep grad None and AdamW leaves them
        # alone, as on one process.
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.dp.device)
        self.dp.all_reduce(reached)
        grads = []
        for p, r in zip(params, reached.tolist()):
            if r:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if self.dp.world > 1:
            from megatron_adapters.grads import allreduce_coalesced

            allreduce_coalesced(grads, dist.group.WORLD)
        self.dp.all_reduce(loss_sum)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss = float(loss_sum / count.clamp_min(1.0))
        stats = self.epoch_stats.setdefault(name, [0.0, 0.0, 0])
        stats[0] += float(loss_sum)
        stats[1] += float(count)
        stats[2] += 1
        return loss

    # ------------------------------------------------------------ validation
    def validate(self, name: str) -> dict:
        """Each rank predicts its share of the validation examples; metrics on all of them."""
        from .finetune import predictions, task_metrics

        spec = self.job.tasks[name]
        mine = predictions(self.model, self.dp.share(self.job.data[name].val), spec.kind, self.args.batch_size,
                           head=name if self.job.multi else None, device=self.dp.device)
        parts = self.dp.gather(mine)
        p, y = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        return task_metrics(spec.kind, p, y, spec.num_labels)

    def end_of_epoch(self, say) -> None:
        from .finetune import _fmt

        epoch = -(-self.step // self.steps_per_epoch)
        record = {"epoch": epoch, "step": self.step, "tasks": {}}
        say(f"epoch {epoch}  step {self.step}/{self.total}")
        for name in self.job.tasks:
            s = self.epoch_stats.get(name)
            r = record["tasks"][name] = {}
            line = f"  {name}: no steps this epoch"
            if s:
                r.update(train_loss=s[0] / max(s[1], 1.0), train_steps=s[2], step_losses=s[3:])
                line = f"  {name}: train_loss {r['train_loss']:.4f} ({s[2]} steps)"
            if self.job.data[name].val:
                r["val"] = self.validate(name)
                line += "  val " + _fmt(r["val"])
            say(line)
        self.history.append(record)
        self.epoch_stats = {}

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        final = self.out / CHECKPOINT
        tmp = self.out / f"{CHECKPOINT}.tmp"
        if self.dp.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"fingerprint": self.fingerprint, "step": self.step, "history": self.history,
                        "epoch_stats": self.epoch_stats, "model": self.model.state_dict(),
                        "optimizer": self.opt.state_dict(),
                        "batches": {n: b.state() for n, b in self.batches.items()}}, tmp / "state.pt")
        self.dp.barrier()
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{self.dp.rank:05d}.pt")
        self.dp.barrier()
        if self.dp.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.dp.barrier()

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not (path / "state.pt").is_file():
            return False
        state = torch.load(path / "state.pt", map_location=self.dp.device, weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                          if state["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(f"--resume: {path} was written with other settings ({', '.join(diff)}); "
                             "use the same command, or another --out")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for n, b in self.batches.items():
            b.load(state["batches"][n])
        self.step, self.history, self.epoch_stats = state["step"], state["history"], state["epoch_stats"]
        rng = path / f"rng-rank{self.dp.rank:05d}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=False)["torch"])
        return True

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        args, is_logger = self.args, self.dp.rank == 0
        say = partial(print, flush=True) if is_logger else (lambda *_: None)
        if args.resume and self.load_checkpoint():
            say(f"resumed from {self.out / CHECKPOINT} at step {self.step}")
        bar = progress(self.total, self.step, is_logger, "finetune")
        if bar is not None:
            say = bar.write
        t0, ran = time.perf_counter(), 0
        self.model.train()
        while self.step < self.total:
            self.step += 1
            ran += 1
            for grp in self.opt.param_groups:
                grp["lr"] = lr_at(self.step, args.lr, max(1, self.total // 10), self.total, 0.1)
            name = self.sampler.sample(self.step)
            loss = self.train_step(name)
            self.epoch_stats[name].append(loss)
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
            self.model.save_pretrained(self.out)
            history = [{**r, "seconds": round(time.perf_counter() - t0, 3)} if i == len(self.history) - 1 else r
                       for i, r in enumerate(self.history)]
            (self.out / "finetune_metrics.json").write_text(json.dumps(history, indent=2) + "\n")
            say(f"saved the fine-tuned model to {self.out}")
        self.dp.barrier()
        return 0
