"""What training and evaluating several tasks adds around the task heads (hyena_glt.heads):

* `TaskSampler` picks the task of each step by weight, a pure function of (seed, step): every
  data-parallel rank agrees, and resuming needs no state;
* `MultiTaskMetrics` keeps per-task metrics (hyena_glt.task_metrics, by the task kind's
  registry entry) over batches and ranks: the fine-tuning trainer's validation, co-training's
  evaluation and `hyena-glt predict` use it.

Both work from `TaskSpec`s (hyena_glt.heads); they sit above the heads because they read the
task-kind registry there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import params
from .heads import TaskSpec, task_kind


class TaskSampler:
    """Task of a step, drawn by weight from a generator seeded by (seed, step): deterministic,
    identical on every rank, stateless across resumption."""

    def __init__(self, weights: dict[str, float], seed: int = 0):
        if not weights or any(not w > 0 for w in weights.values()):
            raise ValueError(f"weights: need one or more tasks with weight > 0, got {weights}")
        self.names = list(weights)
        self.probs = torch.tensor([float(weights[n]) for n in self.names], dtype=torch.float64)
        self.probs /= self.probs.sum()
        self.seed = seed

    def sample(self, step: int) -> str:
        g = torch.Generator().manual_seed(params.param_seed(self.seed, f"task-sampler/{step}"))
        return self.names[int(torch.multinomial(self.probs, 1, generator=g))]


@dataclass
class MultiTaskMetrics:
    """Accumulates predictions (and optionally losses) per task; `compute()` -> {task: metrics}.
    `merge` adds another instance's accumulations (e.g. another data-parallel rank's share)."""

    tasks: dict[str, TaskSpec]
    _preds: dict[str, list] = field(default_factory=dict)
    _labels: dict[str, list] = field(default_factory=dict)
    _loss: dict[str, list] = field(default_factory=dict)

    def update(self, task: str, logits: torch.Tensor, labels: torch.Tensor, loss_sum=None, weight_sum=None) -> None:
        pred = task_kind(self.tasks[task].kind).predict(logits.detach())
        self._preds.setdefault(task, []).append(pred.reshape(-1).cpu())
        self._labels.setdefault(task, []).append(labels.detach().reshape(-1).cpu())
        if loss_sum is not None:
            s, w = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (loss_sum, weight_sum))
            self._loss.setdefault(task, []).append((s, w))

    def merge(self, other: "MultiTaskMetrics") -> None:
        for mine, theirs in ((self._preds, other._preds), (self._labels, other._labels), (self._loss, other._loss)):
            for task, items in theirs.items():
                mine.setdefault(task, []).extend(items)

    def compute(self) -> dict[str, dict]:
        out = {}
        for task, preds in self._preds.items():
            spec = self.tasks[task]
            m = task_kind(spec.kind).metrics(torch.cat(preds), torch.cat(self._labels[task]), spec.num_labels)
            if task in self._loss:
                s, w = map(sum, zip(*self._loss[task]))
                m["loss"] = s / max(w, 1e-8)
            out[task] = m
        return out

    def reset(self) -> None:
        self._preds.clear(), self._labels.clear(), self._loss.clear()
