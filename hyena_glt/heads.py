"""Task heads on the pretrained backbone, and a multi-task model.

* `HyenaGLTForSequenceClassification`: masked mean pooling over the byte states -> pooler
  (dense + tanh) -> dropout -> classifier.
* `HyenaGLTForTokenClassification`: dropout -> classifier at every byte (labels -100 ignored).
* `HyenaGLTForSequenceRegression`: pooling as for classification -> `num_labels` outputs, MSE.
* `HyenaGLTMultiTask`: one shared backbone, named heads (`TaskSpec`). Training and evaluating
  several tasks (`TaskSampler`, `MultiTaskMetrics`) is hyena_glt.multitask.

Task kinds are a registry, `TASK_KINDS`: one `TaskKind` entry per kind holds everything that
differs between kinds (head, loss and its denominator, predictions, metrics, label encoding,
`predict` output). Adding a kind means adding one entry; nothing else looks at kind names. The
metrics are hyena_glt.task_metrics, the label syntax and encoding hyena_glt.labels.

Every head works on either backbone (plain or U-shaped, `model.build_backbone`). Losses are
returned as (sum, count), like the LM's, so partial sums add up across ranks.

`from_pretrained(dir)` accepts a causal LM directory (config.json + model.safetensors from
save_pretrained/convert; the LM head is dropped, the task head is freshly initialised from the
config seed) or a fine-tuned head directory (with head.json; loaded exactly).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .config import HyenaGLTConfig
from .labels import (
    class_label,
    pad_labels,
    record_where,
    regression_label,
    sort_labels,
    stack_labels,
    token_class_labels,
    token_labels,
)
from .model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_state_dict,
    read_config,
    write_pretrained,
)
from .registry import build_backbone
from .task_metrics import classification_metrics, regression_metrics
from .tokenizer import PAD_ID

HEAD_NAME = "head.json"
TASKS_NAME = "tasks.json"  # a multi-task model directory


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


# ---- task kinds: the registry ----
@dataclass(frozen=True)
class TaskKind:
    """Everything that differs between task kinds. Labels are tensors as `encode_label` makes
    them (one example) and `collate_labels` batches them; -100 marks "no label"."""

    name: str
    # (d_model, num_labels, init std, dropout) -> module(hidden (B, L, D), mask (B, L)) -> logits
    head: Callable[[int, int, float, float], nn.Module]
    # (logits, labels) -> the loss summed over labelled outputs (fp32)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # labels -> the loss denominator (how many outputs are labelled); a function of the labels
    # alone, so data parallelism can all-reduce it before the forward
    weight: Callable[[torch.Tensor], torch.Tensor]
    # logits -> predictions (class ids, or values), one per label position
    predict: Callable[[torch.Tensor], torch.Tensor]
    # (predictions, labels, num_labels) -> {"n": ..., metric: value}, flat inputs
    metrics: Callable[[torch.Tensor, torch.Tensor, int], dict]
    metric_keys: tuple[str, ...]  # the metrics printed, in order
    # (training records, where) -> the label names in class-index order, or None (no classes)
    label_names: Callable[[list, str], list[str] | None]
    # (raw label, sequence, {label name: index}, max_len, where) -> this example's label tensor
    encode_label: Callable[[str, str, dict, int, str], torch.Tensor]
    # (label tensors, padded ids length) -> the batch's label tensor
    collate_labels: Callable[[list, int], torch.Tensor]
    output_header: str  # `predict`'s TSV columns after the id
    # (one sequence's logits, its number of ids, label names) -> those columns
    format_output: Callable[[torch.Tensor, int, list[str] | None], str]


def _class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = labels.reshape(-1).long()
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat.clamp_min(0), reduction="none")
    return (ce * (flat != -100)).sum()


def _labelled(labels: torch.Tensor) -> torch.Tensor:
    return (labels != -100).sum().to(torch.float32)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _class_name(k: int, names: list[str] | None) -> str:
    return names[k] if names else str(k)


def _seq_cls_output(logits: torch.Tensor, n_ids: int, names: list[str] | None) -> str:
    probs = logits.float().softmax(-1)
    return f"{_class_name(int(probs.argmax()), names)}\t" + ",".join(f"{float(q):.4f}" for q in probs)


def _token_cls_output(logits: torch.Tensor, n_ids: int, names: list[str] | None) -> str:
    sym = [_class_name(k, names) for k in logits[1:n_ids].argmax(-1).tolist()]
    return ("" if all(len(x) == 1 for x in sym) else " ").join(sym)


def _mse_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits.float(), labels.to(logits.dtype).reshape(logits.shape).float(), reduction="sum")


TASK_KINDS: dict[str, TaskKind] = {k.name: k for k in (
    TaskKind(
        "seq-cls", head=PooledHead, loss=_class_loss, weight=_labelled, predict=_argmax,
        metrics=classification_metrics, metric_keys=("accuracy", "mcc", "f1"),
        label_names=lambda records, where: sort_labels(r.label for r in records),
        encode_label=class_label, collate_labels=stack_labels,
        output_header="label\tprobabilities", format_output=_seq_cls_output,
    ),
    TaskKind(
        "token-cls", head=TokenHead, loss=_class_loss, weight=_labelled, predict=_argmax,
        metrics=classification_metrics, metric_keys=("accuracy", "mcc", "f1"),
        label_names=lambda records, where: sort_labels(
            t for r in records for t in token_labels(r.label, len(r.sequence), record_where(where, r))),
        encode_label=token_class_labels, collate_labels=pad_labels,
        output_header="labels", format_output=_token_cls_output,
    ),
    TaskKind(
        "regression", head=PooledHead, loss=_mse_sum,
        weight=lambda labels: labels.new_tensor(float(labels.numel()), dtype=torch.float32),
        predict=lambda logits: logits.float(), metrics=lambda p, y, num_labels: regression_metrics(p, y),
        metric_keys=("mse", "pearson"), label_names=lambda records, where: None, encode_label=regression_label,
        collate_labels=stack_labels,
        output_header="prediction", format_output=lambda logits, n_ids, names: f"{float(logits[0]):.6g}",
    ),
)}


def task_kind(kind: str) -> TaskKind:
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind: must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    return TASK_KINDS[kind]


def make_head(task: str, d_model: int, num_labels: int, std: float, dropout: float) -> nn.Module:
    return task_kind(task).head(d_model, num_labels, std, dropout)


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): CE per sequence / per labelled byte (-100 ignored), or squared error per output."""
    k = task_kind(task)
    return k.loss(logits, labels), k.weight(labels)


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

    def loss_weight_sum(self, batch: dict) -> torch.Tensor | float:
        """The loss denominator of a batch (its HeadOutput.weight_sum), from its labels alone
        (replicated.ReplicatedModel all-reduces it before the forward)."""
        labels = batch.get("labels")
        return 0.0 if labels is None else task_kind(self.task).weight(labels)

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
        config = read_config(directory, need_weights=True)  # its files checked against checksums.json first
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        head_file = directory / HEAD_NAME
        if head_file.is_file():
            saved = read_head_json(head_file)
            if saved["task"] != cls.task:
                raise ValueError(f"{directory}: holds a {saved['task']!r} model, not {cls.task!r}")
            if num_labels is not None and num_labels != saved["num_labels"]:
                raise ValueError(f"num_labels: {directory} was fine-tuned with {saved['num_labels']}, given {num_labels}")
            model = cls(config, saved["num_labels"], saved["dropout"] if dropout is None else dropout,
                        initialize=False, label_names=saved["label_names"])
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


def head_model_class(kind: str) -> type[_HeadModel]:
    """The single-task model class of a registered task kind: its named class above, or (a kind
    without one) a plain _HeadModel subclass made once."""
    task_kind(kind)
    named = [m for m in _HeadModel.__subclasses__() if m.task == kind]
    if not named:
        named = [type(f"HyenaGLTHeadModel_{kind.replace('-', '_')}", (_HeadModel,), {"task": kind})]
    return named[0]


# ---- the sidecar files: head.json and tasks.json, read and checked in one place ----
MAX_LABELS = 2**20  # outputs of one head: a larger num_labels is a damaged file, not a model
_HEAD_KEYS = ("task", "num_labels", "dropout", "label_names")
_SPEC_KEYS = ("kind", "num_labels", "weight", "label_names")


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _checked_labels(where: str, num_labels, label_names) -> tuple[int, list[str] | None]:
    """(num_labels, label_names) of a head, or ValueError(f'{where}num_labels: ...')."""
    if type(num_labels) is not int or not 1 <= num_labels <= MAX_LABELS:
        raise ValueError(f"{where}num_labels: expected a whole number in [1, {MAX_LABELS}], got {num_labels!r}")
    if label_names is not None:
        if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
            raise ValueError(f"{where}label_names: expected a list of strings or null, got {_json_type(label_names)}")
        if label_names and len(label_names) != num_labels:
            raise ValueError(f"{where}label_names: {len(label_names)} name(s) for num_labels={num_labels}")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"{where}label_names: a name is listed twice")
    return num_labels, label_names or None


def _checked_dropout(where: str, dropout) -> float:
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"{where}dropout: expected a number in [0, 1), got {dropout!r}")
    return float(dropout)


def _sidecar(path: Path, keys: tuple[str, ...]) -> dict:
    """A head.json / tasks.json object: ValueError naming the file for anything but an object of `keys`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with {', '.join(keys)}, got {_json_type(data)}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; expected {', '.join(keys)} (written by another "
                         "version, or damaged)")
    return data


def read_head_json(head_file: str | Path) -> dict:
    """A fine-tuned head directory's head.json, checked: {"task": a registered task kind,
    "num_labels": a whole number in [1, MAX_LABELS], "dropout": a number in [0, 1) (default 0.1),
    "label_names": one string per label, or null}. ValueError naming the file and the field."""
    data = _sidecar(Path(head_file), _HEAD_KEYS)
    for key in ("task", "num_labels"):
        if key not in data:
            raise ValueError(f"{head_file}: missing key {key!r} (the file is damaged or incomplete)")
    task = data["task"]
    if not isinstance(task, str) or task not in TASK_KINDS:
        raise ValueError(f"{head_file}: task: must be one of {', '.join(TASK_KINDS)}, got {task!r}")
    num_labels, names = _checked_labels(f"{head_file}: ", data["num_labels"], data.get("label_names"))
    return {"task": task, "num_labels": num_labels, "dropout": _checked_dropout(f"{head_file}: ", data.get("dropout", 0.1)),
            "label_names": names}


def read_tasks_json(tasks_file: str | Path) -> dict:
    """A multi-task model directory's tasks.json, checked: {"dropout": a number in [0, 1) (default
    0.1), "tasks": {name: {"kind", "num_labels", "weight", "label_names"}}, one or more}, with the
    tasks as TaskSpec. ValueError naming the file and the field (`tasks.NAME.num_labels`)."""
    data = _sidecar(Path(tasks_file), ("dropout", "tasks"))
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"{tasks_file}: tasks: expected an object of one or more named tasks, got {_json_type(tasks)}")
    specs = {}
    for name, t in tasks.items():
        where = f"{tasks_file}: tasks.{name}: "
        if not isinstance(t, dict):
            raise ValueError(f"{where}expected an object with {', '.join(_SPEC_KEYS)}, got {_json_type(t)}")
        unknown = sorted(set(t) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"{where}unknown field(s) {unknown}; expected {', '.join(_SPEC_KEYS)}")
        kind = t.get("kind")
        if not isinstance(kind, str) or kind not in TASK_KINDS:
            raise ValueError(f"{where}kind: must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
        num_labels, names = _checked_labels(where, t.get("num_labels", 2), t.get("label_names"))
        weight = t.get("weight", 1.0)
        if type(weight) not in (int, float) or not 0 < weight < float("inf"):
            raise ValueError(f"{where}weight: expected a finite number > 0, got {weight!r}")
        specs[name] = TaskSpec(kind, num_labels, float(weight), names)
    return {"dropout": _checked_dropout(f"{tasks_file}: ", data.get("dropout", 0.1)), "tasks": specs}


def load_head_model(directory: str | Path, map_location: str = "cpu") -> _HeadModel:
    """A fine-tuned head model of whatever task its head.json names."""
    head_file = Path(directory) / HEAD_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{directory}: no {HEAD_NAME}; expected a directory written by `hyena-glt finetune`")
    try:
        task = read_head_json(head_file)["task"]
    except ValueError:  # damaged since it was saved? checksums.json says so first (as every loader does)
        read_config(directory, need_weights=True)
        raise
    return head_model_class(task).from_pretrained(directory, map_location=map_location)


# ---- multi-task ----
@dataclass
class TaskSpec:
    kind: str  # seq-cls | token-cls | regression
    num_labels: int = 2
    weight: float = 1.0  # sampling weight
    label_names: list[str] | None = None  # class names, index order (classification)

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}")
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

    def loss_weight_sum(self, batch: dict) -> torch.Tensor | float:
        """The loss denominator of a batch of task `batch["task"]` (see _HeadModel.loss_weight_sum)."""
        labels = batch.get("labels")
        return 0.0 if labels is None else task_kind(self.tasks[batch["task"]].kind).weight(labels)

    def load_backbone(self, directory: str | Path, map_location: str = "cpu") -> None:
        """Backbone weights from a causal LM directory (its LM head is dropped)."""
        from safetensors.torch import load_file

        read_config(directory, need_weights=True)  # its files checked against checksums.json first
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
        config = read_config(directory, need_weights=True)  # its files checked against checksums.json first
        meta = read_tasks_json(directory / TASKS_NAME)
        model = cls(config, meta["tasks"], meta["dropout"], initialize=False)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        check_state_dict(model, state, str(directory / WEIGHTS_NAME))
        model.load_state_dict(state, strict=True)
        return model


def task_spec_dict(spec: TaskSpec) -> dict:
    return asdict(spec)
