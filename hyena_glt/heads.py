"""Task heads on the pretrained backbone, a multi-task model, and their metrics.

* `HyenaGLTForSequenceClassification`: masked mean pooling over the byte states -> pooler
  (dense + tanh) -> dropout -> classifier.
* `HyenaGLTForTokenClassification`: dropout -> classifier at every byte (labels -100 ignored).
* `HyenaGLTForSequenceRegression`: pooling as for classification -> `num_labels` outputs, MSE.
* `HyenaGLTMultiTask`: one shared backbone, named heads (`TaskSpec`), `TaskSampler` picks the
  task of each step by weight (a pure function of (seed, step): every data-parallel rank
  agrees, and resuming needs no state), `MultiTaskMetrics` keeps per-task metrics.

Every head works on either backbone (plain or U-shaped, `model.build_backbone`). Losses are
returned as (sum, count), like the LM's, so partial sums add up across ranks.

`from_pretrained(dir)` accepts a causal LM directory (config.json + model.safetensors from
save_pretrained/convert; the LM head is dropped, the task head is freshly initialised from the
config seed) or a fine-tuned head directory (with head.json; loaded exactly).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .config import HyenaGLTConfig
from .model import CONFIG_NAME, WEIGHTS_NAME, build_backbone, check_state_dict, write_pretrained
from .tokenizer import PAD_ID

HEAD_NAME = "head.json"
TASKS_NAME = "tasks.json"  # a multi-task model directory
TASKS = ("seq-cls", "token-cls", "regression")


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C) per sequence, (B, L, C) per byte
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D): mean over positions where mask is set."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---- heads (modules on top of hidden states) ----
class PooledHead(nn.Module):
    """masked mean -> dense + tanh -> dropout -> linear (classification or regression)."""

    def __init__(self, d_model: int, num_outputs: int, std: float, dropout: float):
        super().__init__()
        self.pooler = params.linear(d_model, d_model, std, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.out = params.linear(d_model, num_outputs, std, bias=True)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(masked_mean(hidden, mask)))
        return self.out(self.dropout(pooled))


class TokenHead(nn.Module):
    def __init__(self, d_model: int, num_outputs: int, std: float, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = params.linear(d_model, num_outputs, std, bias=True)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(hidden))


def make_head(task: str, d_model: int, num_labels: int, std: float, dropout: float) -> nn.Module:
    if task == "token-cls":
        return TokenHead(d_model, num_labels, std, dropout)
    if task in ("seq-cls", "regression"):
        return PooledHead(d_model, num_labels, std, dropout)
    raise ValueError(f"task: must be one of {', '.join(TASKS)}, got {task!r}")


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): CE per sequence / per labelled byte (-100 ignored), or squared error per output."""
    if task == "regression":
        target = labels.to(logits.dtype).reshape(logits.shape)
        return F.mse_loss(logits.float(), target.float(), reduction="sum"), logits.new_tensor(float(logits.numel()))
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1).long()
    valid = flat != -100
    ce = F.cross_entropy(flat_logits, flat.clamp_min(0), reduction="none")
    return (ce * valid).sum(), valid.sum().to(ce.dtype)


# ---- single-task models ----
class _HeadModel(nn.Module):
    task: str = ""

    def __init__(self, config: HyenaGLTConfig, num_labels: int = 2, dropout: float = 0.1, initialize: bool = True,
                 label_names: list[str] | None = None):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels: must be >= 1, got {num_labels}")
        self.config, self.num_labels, self.dropout_p = config, num_labels, dropout
        self.label_names = list(label_names) if label_names else None
        self.model = build_backbone(config)
        self.head = make_head(self.task, config.d_model, num_labels, config.init_std, dropout)
        if initialize:
            params.initialize(self, config.seed)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_type: torch.Tensor | None = None,
    ) -> HeadOutput:
        if attention_mask is None:
            attention_mask = input_ids != PAD_ID
        hidden = self.model(input_ids, seq_type)
        logits = self.head(hidden, attention_mask)
        out = HeadOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            out.loss_sum, out.weight_sum = task_loss(self.task, logits, labels)
            out.loss = out.loss_sum / out.weight_sum.clamp_min(1.0)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints ----
    def head_config(self) -> dict:
        return {"task": self.task, "num_labels": self.num_labels, "dropout": self.dropout_p, "label_names": self.label_names}

    def save_pretrained(self, directory: str | Path) -> Path:
        return write_pretrained(self, directory, {HEAD_NAME: self.head_config()}, {"task": self.task})

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, num_labels: int | None = None, dropout: float | None = None,
        label_names: list[str] | None = None, map_location: str = "cpu",
    ):
        """A fine-tuned head directory (head.json) loads exactly; a causal LM directory gives a
        new head on its backbone (lm_head dropped, head initialised from the config seed)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name}; expected a directory written by save_pretrained")
        config = HyenaGLTConfig.from_json(directory / CONFIG_NAME)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        head_file = directory / HEAD_NAME
        if head_file.is_file():
            saved = json.loads(head_file.read_text())
            if saved.get("task") != cls.task:
                raise ValueError(f"{directory}: holds a {saved.get('task')!r} model, not {cls.task!r}")
            if num_labels is not None and num_labels != saved["num_labels"]:
                raise ValueError(f"num_labels: {directory} was fine-tuned with {saved['num_labels']}, given {num_labels}")
            model = cls(config, saved["num_labels"], saved.get("dropout", 0.1) if dropout is None else dropout,
                        initialize=False, label_names=saved.get("label_names"))
            check_state_dict(model, state, str(directory / WEIGHTS_NAME))
            model.load_state_dict(state, strict=True)
            return model
        model = cls(config, 2 if num_labels is None else num_labels, 0.1 if dropout is None else dropout,
                    initialize=True, label_names=label_names)
        backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        check_state_dict(model.model, backbone, str(directory / WEIGHTS_NAME))
        model.model.load_state_dict(backbone, strict=True)
        return model


class HyenaGLTForSequenceClassification(_HeadModel):
    task = "seq-cls"


class HyenaGLTForTokenClassification(_HeadModel):
    task = "token-cls"


class HyenaGLTForSequenceRegression(_HeadModel):
    task = "regression"


HEAD_MODELS = {m.task: m for m in (HyenaGLTForSequenceClassification, HyenaGLTForTokenClassification, HyenaGLTForSequenceRegression)}


def load_head_model(directory: str | Path, map_location: str = "cpu") -> _HeadModel:
    """A fine-tuned head model of whatever task its head.json names."""
    head_file = Path(directory) / HEAD_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{directory}: no {HEAD_NAME}; expected a directory written by `hyena-glt finetune`")
    task = json.loads(head_file.read_text()).get("task")
    if task not in HEAD_MODELS:
        raise ValueError(f"{head_file}: unknown task {task!r}")
    return HEAD_MODELS[task].from_pretrained(directory, map_location=map_location)


# ---- multi-task ----
@dataclass
class TaskSpec:
    kind: str  # seq-cls | token-cls | regression
    num_labels: int = 2
    weight: float = 1.0  # sampling weight
    label_names: list[str] | None = None  # class names, index order (classification)

    def __post_init__(self):
        if self.kind not in TASKS:
            raise ValueError(f"kind: must be one of {', '.join(TASKS)}, got {self.kind!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels: must be >= 1, got {self.num_labels}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")


class HyenaGLTMultiTask(nn.Module):
    """A shared backbone with one named head per task. forward(..., task=name)."""

    def __init__(self, config: HyenaGLTConfig, tasks: dict[str, TaskSpec | dict], dropout: float = 0.1, initialize: bool = True):
        super().__init__()
        if not tasks:
            raise ValueError("tasks: need at least one task")
        self.config, self.dropout_p = config, dropout
        self.tasks = {n: (t if isinstance(t, TaskSpec) else TaskSpec(**t)) for n, t in tasks.items()}
        self.model = build_backbone(config)
        self.heads = nn.ModuleDict(
            {n: make_head(t.kind, config.d_model, t.num_labels, config.init_std, dropout) for n, t in self.tasks.items()}
        )
        if initialize:
            params.initialize(self, config.seed)

    def forward(self, input_ids, task: str, labels=None, attention_mask=None, seq_type=None) -> HeadOutput:
        if task not in self.tasks:
            raise ValueError(f"task: unknown task {task!r}; have {sorted(self.tasks)}")
        if attention_mask is None:
            attention_mask = input_ids != PAD_ID
        hidden = self.model(input_ids, seq_type)
        logits = self.heads[task](hidden, attention_mask)
        out = HeadOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            out.loss_sum, out.weight_sum = task_loss(self.tasks[task].kind, logits, labels)
            out.loss = out.loss_sum / out.weight_sum.clamp_min(1.0)
        return out

    def load_backbone(self, directory: str | Path, map_location: str = "cpu") -> None:
        """Backbone weights from a causal LM directory (its LM head is dropped)."""
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(map_location))
        backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        check_state_dict(self.model, backbone, str(Path(directory) / WEIGHTS_NAME))
        self.model.load_state_dict(backbone, strict=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors (backbone and every head) + tasks.json (specs, dropout)."""
        meta = {"dropout": self.dropout_p, "tasks": {n: task_spec_dict(t) for n, t in self.tasks.items()}}
        return write_pretrained(self, directory, {TASKS_NAME: meta}, {"task": "multi-task"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "HyenaGLTMultiTask":
        """A directory written by save_pretrained (tasks.json), loaded exactly."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME, TASKS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name}; expected a directory written by a multi-task finetune")
        meta = json.loads((directory / TASKS_NAME).read_text())
        model = cls(HyenaGLTConfig.from_json(directory / CONFIG_NAME), meta["tasks"], meta.get("dropout", 0.1),
                    initialize=False)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        check_state_dict(model, state, str(directory / WEIGHTS_NAME))
        model.load_state_dict(state, strict=True)
        return model


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


# ---- metrics ----
def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int | None = None) -> dict:
    """accuracy, MCC (Gorodkin's multi-class R_K; the usual MCC for two classes) and F1
    (of class 1 for two classes, macro otherwise). Ignores labels == -100."""
    preds, labels = preds.detach().reshape(-1).long(), labels.detach().reshape(-1).long()
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    n = int(labels.numel())
    if n == 0:
        return {"accuracy": float("nan"), "mcc": float("nan"), "f1": float("nan"), "n": 0}
    K = int(num_labels or int(max(preds.max(), labels.max())) + 1)
    cm = torch.zeros(K, K, dtype=torch.float64)
    cm.index_put_((labels, preds), torch.ones(n, dtype=torch.float64), accumulate=True)
    correct, t, p = cm.trace(), cm.sum(1), cm.sum(0)
    cov = correct * n - (t * p).sum()
    denom = math.sqrt(float((n * n - (p * p).sum()) * (n * n - (t * t).sum())))
    mcc = float(cov) / denom if denom > 0 else 0.0
    tp = cm.diag()
    prec = tp / p.clamp_min(1)
    rec = tp / t.clamp_min(1)
    f1s = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(prec))
    f1 = float(f1s[1]) if K == 2 else float(f1s.mean())
    return {"accuracy": float(correct) / n, "mcc": mcc, "f1": f1, "n": n}


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict:
    p, t = preds.detach().reshape(-1).double(), targets.detach().reshape(-1).double()
    mse = float(((p - t) ** 2).mean()) if p.numel() else float("nan")
    pc, tc = p - p.mean(), t - t.mean()
    denom = float(pc.norm() * tc.norm())
    pearson = float((pc * tc).sum()) / denom if denom > 0 else 0.0
    return {"mse": mse, "pearson": pearson, "n": int(p.numel())}


@dataclass
class MultiTaskMetrics:
    """Accumulates predictions per task; `compute()` -> {task: metrics}."""

    tasks: dict[str, TaskSpec]
    _preds: dict[str, list] = field(default_factory=dict)
    _labels: dict[str, list] = field(default_factory=dict)
    _loss: dict[str, list] = field(default_factory=dict)

    def update(self, task: str, logits: torch.Tensor, labels: torch.Tensor, loss_sum=None, weight_sum=None) -> None:
        kind = self.tasks[task].kind
        pred = logits.detach().float() if kind == "regression" else logits.detach().argmax(-1)
        self._preds.setdefault(task, []).append(pred.reshape(-1).cpu())
        self._labels.setdefault(task, []).append(labels.detach().reshape(-1).cpu())
        if loss_sum is not None:
            self._loss.setdefault(task, []).append((float(loss_sum.detach()) if torch.is_tensor(loss_sum) else float(loss_sum), float(weight_sum)))

    def compute(self) -> dict[str, dict]:
        out = {}
        for task, preds in self._preds.items():
            p, y = torch.cat(preds), torch.cat(self._labels[task])
            spec = self.tasks[task]
            m = regression_metrics(p, y) if spec.kind == "regression" else classification_metrics(p, y, spec.num_labels)
            if task in self._loss:
                s, w = map(sum, zip(*self._loss[task]))
                m["loss"] = s / max(w, 1e-8)
            out[task] = m
        return out

    def reset(self) -> None:
        self._preds.clear(), self._labels.clear(), self._loss.clear()


def task_spec_dict(spec: TaskSpec) -> dict:
    return asdict(spec)
