"""`hyena-glt finetune` and `hyena-glt predict`: task heads on a pretrained model.

    hyena-glt finetune --model PRETRAINED_DIR --task seq-cls --train train.csv --val val.csv --out runs/ft
    hyena-glt finetune --model PRETRAINED_DIR --tasks tasks.yaml --out runs/mt      # multi-task
    hyena-glt predict --model runs/ft --input new.fasta
    hyena-glt predict --model runs/mt --task promoter --input new.fasta

Data: CSV/TSV (`sequence,label`) or FASTA with labels in the headers (data_tools/labelled.py).
Classification prints accuracy, MCC and F1; regression prints MSE and Pearson r.

Multi-task (`--tasks`, a YAML file, see MultiTaskFile): one shared backbone, one named head
per task; each step trains one task's batch, drawn by weight (TaskSampler: a function of
(seed, step), so a rerun draws the same tasks); metrics are kept and printed per task.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .metrics import progress


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a task head (seq-cls, token-cls, regression) on a pretrained model",
                       description="Fine-tune a task head on a pretrained model; prints accuracy/MCC/F1 or MSE/Pearson.")
    p.add_argument("--model", required=True, help="pretrained model dir (config.json + model.safetensors)")
    p.add_argument("--task", choices=["seq-cls", "token-cls", "regression"], help="one task (with --train)")
    p.add_argument("--train", help="CSV/TSV (sequence,label) or FASTA with labels in headers")
    p.add_argument("--tasks", metavar="YAML", help="multi-task: named tasks (kind, train, val, weight) on one backbone")
    p.add_argument("--val", help="validation file (same formats); metrics are printed after each epoch")
    p.add_argument("--out", default="runs/finetune", help="where the fine-tuned model is saved")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (multi-task: all tasks' batches)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=1024, help="longer sequences are truncated to this many bases")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("predict", help="predict with a fine-tuned model", description="Predict labels or values.")
    p.add_argument("--model", required=True, help="directory written by `hyena-glt finetune`")
    p.add_argument("--task", help="multi-task model: which task's head predicts")
    p.add_argument("--input", help="CSV/TSV/FASTA (labels optional; if all present, metrics are printed)")
    p.add_argument("--sequence", action="append", default=[], help="a sequence to predict (repeatable)")
    p.add_argument("--output", help="also write the predictions as TSV to this file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1024)
    p.set_defaults(func=_predict)


# ---- data -> tensors ----
def _sort_labels(names) -> list[str]:
    names = sorted(set(names))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def encode_examples(records, task: str, label_names: list[str] | None, max_len: int, where: str):
    """-> list of (ids (L+1,), label tensor or None). ids = [BOS] + bases (upper-cased)."""
    import torch

    from hyena_glt import ByteTokenizer

    tok = ByteTokenizer()
    index = {n: i for i, n in enumerate(label_names or [])}
    out = []
    for r in records:
        seq = r.sequence[:max_len]
        ids = tok.encode(seq, add_bos=True).ids
        label = None
        if r.label is not None:
            if task == "regression":
                try:
                    label = torch.tensor([float(r.label)])
                except ValueError:
                    raise ValueError(f"{where}: record {r.id}: regression label {r.label!r} is not a number") from None
            elif task == "seq-cls":
                if r.label not in index:
                    raise ValueError(f"{where}: record {r.id}: label {r.label!r} not among the training labels {label_names}")
                label = torch.tensor(index[r.label])
            else:
                from data_tools.labelled import token_labels

                toks = token_labels(r.label, len(r.sequence), f"{where}: record {r.id}")[:max_len]
                bad = sorted(set(toks) - set(index))
                if bad:
                    raise ValueError(f"{where}: record {r.id}: token labels {bad} not among the training labels {label_names}")
                # The causal state at position i+1 has read base i: label it there; BOS gets none.
                label = torch.tensor([-100] + [index[t] for t in toks])
        out.append((ids, label))
    return out


def collate(examples, task: str):
    import torch

    from hyena_glt.tokenizer import PAD_ID

    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), PAD_ID, dtype=torch.long)
    for i, (x, _) in enumerate(examples):
        ids[i, : len(x)] = x
    labels = None
    if all(lab is not None for _, lab in examples):
        if task == "token-cls":
            labels = torch.full((len(examples), L), -100, dtype=torch.long)
            for i, (_, lab) in enumerate(examples):
                labels[i, : len(lab)] = lab
        else:
            labels = torch.stack([lab for _, lab in examples])
    return ids, labels


def evaluate(model, examples, task: str, batch_size: int, head: str | None = None) -> dict:
    """Metrics of one task on labelled examples; `head` names the task of a multi-task model."""
    import torch

    from hyena_glt.heads import classification_metrics, regression_metrics

    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, lab = collate(examples[i : i + batch_size], task)
            logits = (model(ids) if head is None else model(ids, task=head)).logits
            preds.append((logits.float() if task == "regression" else logits.argmax(-1)).reshape(-1))
            labels.append(lab.reshape(-1))
    model.train()
    p, y = torch.cat(preds), torch.cat(labels)
    if task == "regression":
        return regression_metrics(p, y)
    return classification_metrics(p, y, model.num_labels if head is None else model.tasks[head].num_labels)


def _fmt(m: dict) -> str:
    keys = ("mse", "pearson") if "mse" in m else ("accuracy", "mcc", "f1")
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys) + f"  (n={m['n']})"


# ---- commands ----
@dataclass
class PreparedTask:
    kind: str
    train: list
    val: list | None
    label_names: list[str] | None
    num_labels: int


def prepare_task(kind: str, train_path: str, val_path: str | None, max_len: int) -> PreparedTask:
    """Read and encode one task's files; class names come from the training labels."""
    from data_tools.labelled import read_labelled, token_labels

    train_records = read_labelled(train_path)
    val_records = read_labelled(val_path) if val_path else None
    if kind == "seq-cls":
        label_names = _sort_labels(r.label for r in train_records)
    elif kind == "token-cls":
        label_names = _sort_labels(t for r in train_records for t in token_labels(r.label, len(r.sequence), f"{train_path}: {r.id}"))
    else:
        label_names = None
    num_labels = 1 if kind == "regression" else len(label_names)
    if kind != "regression" and num_labels < 2:
        raise ValueError(f"{train_path}: need at least two different labels for {kind}, found {label_names}")
    train = encode_examples(train_records, kind, label_names, max_len, train_path)
    val = encode_examples(val_records, kind, label_names, max_len, val_path) if val_records else None
    return PreparedTask(kind, train, val, label_names, num_labels)


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["seq-cls", "token-cls", "regression"]
    train: str = Field(description="training file (CSV/TSV/FASTA); relative paths are read from the YAML's folder")
    val: str | None = Field(None, description="validation file, same formats")
    weight: float = Field(1.0, gt=0, description="sampling weight: the share of steps that train this task")


class MultiTaskFile(BaseModel):
    """`--tasks` YAML:

        tasks:
          promoter: {kind: seq-cls, train: promoter_train.csv, val: promoter_val.csv, weight: 2}
          gc:       {kind: regression, train: gc.tsv}
    """

    model_config = ConfigDict(extra="forbid")
    tasks: dict[str, TaskEntry] = Field(min_length=1)

    @classmethod
    def load(cls, path: str) -> "MultiTaskFile":
        import yaml
        from pydantic import ValidationError

        f = Path(path)
        if not f.is_file():
            raise FileNotFoundError(f"--tasks {path}: no such file")
        try:
            spec = cls.model_validate(yaml.safe_load(f.read_text()) or {})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{path}: {where}: {err['msg']}") from None
        for t in spec.tasks.values():  # paths relative to the YAML file
            t.train = str(f.parent / t.train)
            t.val = str(f.parent / t.val) if t.val else None
        return spec


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.tasks and (args.task or args.train or args.val):
        raise ValueError("finetune: give either --tasks YAML (multi-task) or --task/--train/--val (one task), not both")
    if not args.tasks and not (args.task and args.train):
        raise ValueError("finetune: give --task and --train (one task), or --tasks YAML (multi-task)")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")


def _finetune(args) -> int:
    import torch

    from hyena_glt.heads import HEAD_MODELS

    from .optim import build_adamw, lr_at

    _check_args(args)
    torch.manual_seed(args.seed)
    if args.tasks:
        return _finetune_multi(args)
    data = prepare_task(args.task, args.train, args.val, args.max_len)
    train, val, label_names, num_labels = data.train, data.val, data.label_names, data.num_labels

    model = HEAD_MODELS[args.task].from_pretrained(args.model, num_labels=num_labels, dropout=args.dropout, label_names=label_names)
    if model.label_names is None and label_names:
        model.label_names = label_names
    opt = build_adamw(model, args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    print(f"finetune {args.task}: {len(train)} train / {len(val) if val else 0} val sequences, "
          f"{num_labels} output(s){' ' + str(label_names) if label_names else ''}, {model.num_parameters():,} parameters, "
          f"{total} steps", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    step, t0, history = 0, time.perf_counter(), []
    bar = progress(total, 0, True, f"finetune {args.task}")
    say = bar.write if bar is not None else partial(print, flush=True)
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        loss_sum, n = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            if step >= total:
                break
            step += 1
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, args.lr, max(1, total // 10), total, 0.1)
            ids, labels = collate([train[j] for j in order[i : i + args.batch_size]], args.task)
            out = model(ids, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += out.loss.item()
            n += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss.item():.4f}")
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(n, 1), "seconds": time.perf_counter() - t0}
        line = f"epoch {epoch}  step {step}  train_loss {record['train_loss']:.4f}"
        if val:
            record["val"] = evaluate(model, val, args.task, args.batch_size)
            line += "  val " + _fmt(record["val"])
        say(line)
        history.append(record)
        if step >= total:
            break
    return _finish(model, history, bar, args.out, "fine-tuned")


def _finish(model, history: list, bar, out: str, what: str) -> int:
    if bar is not None:
        bar.close()
    out_dir = Path(out)
    model.save_pretrained(out_dir)
    (out_dir / "finetune_metrics.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"saved the {what} model to {out_dir}")
    return 0


class _TaskBatches:
    """Endless shuffled batches of one task: a new permutation each pass, from its own generator."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        import torch

        self.examples, self.batch_size = examples, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list:
        import torch

        if len(self.order) < min(self.batch_size, len(self.examples)):
            self.order = torch.randperm(len(self.examples), generator=self.g).tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.examples[j] for j in batch]


def _finetune_multi(args) -> int:
    import torch

    from hyena_glt import HyenaGLTConfig
    from hyena_glt.heads import HyenaGLTMultiTask, MultiTaskMetrics, TaskSampler, TaskSpec
    from hyena_glt.model import CONFIG_NAME
    from hyena_glt.params import param_seed

    from .optim import build_adamw, lr_at

    spec = MultiTaskFile.load(args.tasks)
    data = {name: prepare_task(t.kind, t.train, t.val, args.max_len) for name, t in spec.tasks.items()}
    tasks = {name: TaskSpec(d.kind, d.num_labels, spec.tasks[name].weight, d.label_names) for name, d in data.items()}
    config_file = Path(args.model) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"--model {args.model}: no {CONFIG_NAME}; expected a pretrained model directory")
    model = HyenaGLTMultiTask(HyenaGLTConfig.from_json(config_file), tasks, dropout=args.dropout)
    model.load_backbone(args.model)
    opt = build_adamw(model, args.lr, args.weight_decay)
    # An "epoch" is as many steps as all tasks' training batches together.
    steps_per_epoch = sum(math.ceil(len(d.train) / args.batch_size) for d in data.values())
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    sampler = TaskSampler({n: t.weight for n, t in tasks.items()}, seed=args.seed)
    batches = {n: _TaskBatches(d.train, args.batch_size, param_seed(args.seed, f"finetune/{n}")) for n, d in data.items()}
    print(f"finetune multi-task: {len(tasks)} tasks on one backbone, {model.num_parameters():,} parameters, "
          f"{total} steps", flush=True)
    for n, d in data.items():
        print(f"  {n}: {d.kind}, {len(d.train)} train / {len(d.val) if d.val else 0} val sequences, "
              f"{d.num_labels} output(s){' ' + str(d.label_names) if d.label_names else ''}, "
              f"weight {tasks[n].weight:g}", flush=True)
    step, t0, history = 0, time.perf_counter(), []
    train_metrics = MultiTaskMetrics(tasks)
    bar = progress(total, 0, True, "finetune multi-task")
    say = bar.write if bar is not None else partial(print, flush=True)
    model.train()
    while step < total:
        step += 1
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.lr, max(1, total // 10), total, 0.1)
        name = sampler.sample(step)
        ids, labels = collate(batches[name].next(), tasks[name].kind)
        out = model(ids, task=name, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_metrics.update(name, out.logits, labels, out.loss_sum, out.weight_sum)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=name, loss=f"{out.loss.item():.4f}")
        if step % steps_per_epoch == 0 or step == total:
            record = {"step": step, "seconds": time.perf_counter() - t0, "tasks": {}}
            say(f"step {step}/{total}")
            for n, m in train_metrics.compute().items():
                record["tasks"].setdefault(n, {})["train_loss"] = m["loss"]
                record["tasks"][n]["train_steps"] = m["batches"]
            for n in tasks:
                r = record["tasks"].setdefault(n, {})
                line = f"  {n}: train_loss {r['train_loss']:.4f} ({r['train_steps']} steps)" if "train_loss" in r else f"  {n}: no steps yet"
                if data[n].val:
                    r["val"] = evaluate(model, data[n].val, tasks[n].kind, args.batch_size, head=n)
                    line += "  val " + _fmt(r["val"])
                say(line)
            history.append(record)
            train_metrics.reset()
    return _finish(model, history, bar, args.out, "multi-task")


def _predict(args) -> int:
    import torch

    from data_tools.labelled import LabelledRecord, read_labelled
    from hyena_glt.heads import TASKS_NAME, HyenaGLTMultiTask, load_head_model

    if not args.input and not args.sequence:
        raise ValueError("predict: give --input FILE or one or more --sequence SEQ")
    head = None
    if (Path(args.model) / TASKS_NAME).is_file():  # a multi-task model: one of its heads
        model = HyenaGLTMultiTask.from_pretrained(args.model).eval()
        if args.task is None and len(model.tasks) == 1:
            args.task = next(iter(model.tasks))
        if args.task not in model.tasks:
            raise ValueError(f"predict --task: {args.model} is a multi-task model; name one of {sorted(model.tasks)}"
                             + (f" (got {args.task!r})" if args.task else ""))
        head, task, names = args.task, model.tasks[args.task].kind, model.tasks[args.task].label_names
    else:
        model = load_head_model(args.model).eval()
        task, names = model.task, model.label_names
        if args.task is not None:
            raise ValueError(f"predict --task: {args.model} is a single-task ({task}) model; drop --task")
    records = read_labelled(args.input, require_labels=False) if args.input else []
    records += [LabelledRecord(f"seq{i + 1}", s, None) for i, s in enumerate(args.sequence)]
    examples = encode_examples(records, task, names, args.max_len, args.input or "--sequence")
    lines = []
    with torch.no_grad():
        for i in range(0, len(examples), args.batch_size):
            chunk = examples[i : i + args.batch_size]
            ids, _ = collate(chunk, task)
            logits = (model(ids) if head is None else model(ids, task=head)).logits
            for j, (x, _) in enumerate(chunk):
                rec = records[i + j]
                if task == "regression":
                    lines.append(f"{rec.id}\t{float(logits[j, 0]):.6g}")
                elif task == "seq-cls":
                    probs = logits[j].float().softmax(-1)
                    k = int(probs.argmax())
                    label = names[k] if names else str(k)
                    lines.append(f"{rec.id}\t{label}\t" + ",".join(f"{float(q):.4f}" for q in probs))
                else:
                    pred = logits[j, 1 : len(x)].argmax(-1).tolist()
                    sym = [names[k] if names else str(k) for k in pred]
                    sep = "" if all(len(s) == 1 for s in sym) else " "
                    lines.append(f"{rec.id}\t{sep.join(sym)}")
    header = {"regression": "id\tprediction", "seq-cls": "id\tlabel\tprobabilities", "token-cls": "id\tlabels"}[task]
    print(header)
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(header + "\n" + "\n".join(lines) + "\n")
    if records and all(r.label is not None for r in records):
        print("metrics: " + _fmt(evaluate(model, examples, task, args.batch_size, head=head)))
    return 0
