"""`tasks:` in `hyena-glt train`: the tasks' data, each step's task micro-batches, their metrics.

The model side (heads on the parallel model's final hidden states, the objective) is
megatron_adapters/task_heads.py. Here:

* `load_tasks`: each task's labelled files read and encoded as `hyena-glt finetune` does
  (finetune_data.prepare_task; class names from the training labels); sequences are cut to
  train.seq_len - 1 bases, so that with BOS they fit the LM's micro-batch length.
* `TaskBatches`: every step trains every task. Task k's global batch of step s is its picks
  (s-1)*G_k .. s*G_k - 1, pick j being example perm_e(j mod N_k) of epoch e = j // N_k, the
  permutation seeded by (train.seed, task, e) (data_tools/permutation.py, as the LM loader
  does). So the batches are a function of the seed and the step alone: identical under
  every layout, and a resume needs no state. Data-parallel rank r takes slots
  [r*G_k/dp, (r+1)*G_k/dp), cut into micro-batches of train.micro_batch_size padded to
  train.seq_len (every micro-batch of a pipeline schedule has one shape).
* `evaluate_tasks`: the metrics of hyena_glt.heads (accuracy/MCC/F1, MSE/Pearson) on each
  task's whole validation file, written to metrics.jsonl as `task/<name>/val_<metric>`.
* Checkpoints: the heads are parameters of the model (saved and resumed with it); `meta`
  records each task's spec (what `hyena-glt convert` needs to write the multi-task model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_tools.permutation import epoch_picks
from hyena_glt.heads import TaskSpec, task_spec_dict
from hyena_glt.multitask import MultiTaskMetrics
from launch.finetune.data import PreparedTask, collate, prepare_task

LOSS_KEY = "task/{}/loss"
VAL_KEY = "task/{}/val_{}"


@dataclass
class CoTask:
    spec: TaskSpec
    data: PreparedTask
    global_batch_size: int


def load_tasks(cfg) -> dict[str, CoTask]:
    """Every task of `cfg.tasks`, read and encoded; errors name the task and the file."""
    out = {}
    for name, t in cfg.tasks.items():
        try:
            d = prepare_task(t.kind, t.train, t.val, cfg.train.seq_len - 1)
        except (OSError, ValueError) as e:
            raise ValueError(f"tasks.{name}: {' '.join(str(e).split())}") from None
        out[name] = CoTask(TaskSpec(d.kind, d.num_labels, t.weight, d.label_names), d, cfg.task_batch_size(name))
    return out


def task_meta(tasks: dict[str, CoTask]) -> dict:
    """What a checkpoint records of the tasks: `tasks` (the heads' specs, as a multi-task model
    directory's tasks.json holds them) and `task_data` (what the batches depend on)."""
    return {"tasks": {n: task_spec_dict(t.spec) for n, t in tasks.items()},
            "task_data": {n: {"global_batch_size": t.global_batch_size, "train_examples": len(t.data.train)}
                          for n, t in tasks.items()}}


def check_resume(saved: dict, tasks: dict[str, CoTask], where: str) -> None:
    """A checkpoint resumes only with the same tasks, heads and task batches; the weights may change."""
    mine = task_meta(tasks)
    have = {"tasks": saved.get("tasks") or {}, "task_data": saved.get("task_data") or {}}
    if sorted(have["tasks"]) != sorted(mine["tasks"]):
        raise ValueError(f"{where}: written with tasks {sorted(have['tasks']) or 'none'}, this run has "
                         f"{sorted(mine['tasks']) or 'none'}; resume with the same tasks, or start a new checkpoint.dir "
                         "with train.init_from=<the converted model> to keep its weights")
    for name in mine["tasks"]:
        for part in ("tasks", "task_data"):
            a, b = have[part].get(name, {}), mine[part][name]
            diff = [k for k in b if k != "weight" and a.get(k) != b[k]]
            if diff:
                raise ValueError(f"{where}: task {name!r} differs in {diff[0]} (checkpoint {a.get(diff[0])!r}, this run "
                                 f"{b[diff[0]]!r}); resume with the same task data, or start a new checkpoint.dir")


class TaskBatches:
    """This data-parallel rank's task micro-batches (module docstring)."""

    def __init__(self, tasks: dict[str, CoTask], seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.tasks, self.seq_len, self.mbs = tasks, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed

    def _micro_batch(self, name: str, examples: list) -> dict:
        ids, labels = collate(examples, self.tasks[name].spec.kind, self.seq_len)
        return {"input_ids": ids, "labels": labels, "task": name}

    def micro_batches(self, step: int) -> list[dict]:
        """Step `step`'s (1-based) micro-batches of every task, task by task."""
        out = []
        for name, task in self.tasks.items():
            g, per_rank = task.global_batch_size, task.global_batch_size // self.dp_size
            first = (step - 1) * g + self.dp_rank * per_rank
            picks = epoch_picks(np.arange(first, first + per_rank, dtype=np.int64), len(task.data.train),
                           f"{self.seed}:task:{name}")
            examples = [task.data.train[i] for i in picks]
            out += [self._micro_batch(name, examples[j : j + self.mbs]) for j in range(0, per_rank, self.mbs)]
        return out

    def val_micro_batches(self, pp: int, interleaved: bool) -> list[dict]:
        """This rank's share of every validation example, in micro-batches; each has `keep` (B,),
        False on the rows that only fill a micro-batch. Every data-parallel rank gets as many
        of each task, task by task (ZeRO-3 gathers a head's parameters around its forward, a
        collective over data parallelism), and in all a multiple of pp for an interleaved
        pipeline, so the ranks' collectives stay matched."""
        mine = []
        for name, task in self.tasks.items():
            val = task.data.val or []
            every = []
            for j in range(0, len(val), self.mbs):
                chunk = val[j : j + self.mbs]
                mb = self._micro_batch(name, chunk + [val[0]] * (self.mbs - len(chunk)))
                mb["keep"] = torch.arange(self.mbs) < len(chunk)
                every.append(mb)
            if every:
                filler = {**every[0], "keep": torch.zeros(self.mbs, dtype=torch.bool)}
                share = every[self.dp_rank :: self.dp_size]
                mine += share + [filler] * (-(-len(every) // self.dp_size) - len(share))
        if interleaved and mine:
            mine += [{**mine[-1], "keep": torch.zeros(self.mbs, dtype=torch.bool)}] * (-len(mine) % pp)
        return mine


def step_record(losses: dict[str, float]) -> dict:
    """metrics.jsonl entries of a step's parts (TaskHeadsModel.last_losses): lm_loss, task/<name>/loss."""
    return {"lm_loss": losses["lm"], **{LOSS_KEY.format(n): v for n, v in losses.items() if n != "lm"}}


@torch.no_grad()
def evaluate_tasks(pm, batches: TaskBatches, autocast) -> dict:
    """Collective: each task's validation metrics, the same dict on every rank ({} without val files)."""
    pcfg = pm.ctx.pcfg
    mine = batches.val_micro_batches(pcfg.pp, pcfg.vpp is not None)
    if not mine:
        return {}
    logits: list[torch.Tensor] = []
    with autocast():
        pm.run_tasks(mine, forward_only=True, logits_out=logits)
    metrics = MultiTaskMetrics({n: t.spec for n, t in batches.tasks.items()})
    for mb, lg in zip(mine, logits):  # (logits: only on one rank per pipeline)
        if mb["keep"].any():
            metrics.update(mb["task"], lg[mb["keep"].to(lg.device)], mb["labels"][mb["keep"]])
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, metrics)
    merged = MultiTaskMetrics(metrics.tasks)
    for part in parts:
        merged.merge(part)
    return {VAL_KEY.format(n, k): v for n, m in merged.compute().items() for k, v in m.items()}
