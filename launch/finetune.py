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
The loop (data parallel under torchrun, checkpoints, --resume) is finetune_trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field



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
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at each epoch end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    p.add_argument("--exit-after-steps", type=int, default=0,
                   help="save a checkpoint and exit after N steps of this run (then --resume)")
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


def predictions(model, examples, task: str, batch_size: int, head: str | None = None, device=None):
    """(predictions, labels), flat, of labelled examples: class ids, or values for regression.
    `head` names the task of a multi-task model."""
    import torch

    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, lab = collate(examples[i : i + batch_size], task)
            ids = ids.to(device) if device is not None else ids
            logits = (model(ids) if head is None else model(ids, task=head)).logits
            preds.append((logits.float() if task == "regression" else logits.argmax(-1)).reshape(-1).cpu())
            labels.append(lab.reshape(-1))
    model.train()
    if not preds:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def task_metrics(task: str, preds, labels, num_labels: int) -> dict:
    from hyena_glt.heads import classification_metrics, regression_metrics

    return regression_metrics(preds, labels) if task == "regression" else classification_metrics(preds, labels, num_labels)


def evaluate(model, examples, task: str, batch_size: int, head: str | None = None) -> dict:
    """Metrics of one task on labelled examples (one process)."""
    num_labels = model.num_labels if head is None else model.tasks[head].num_labels
    return task_metrics(task, *predictions(model, examples, task, batch_size, head), num_labels)


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
    for name in ("max_steps", "save_every", "exit_after_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if args.tasks and (args.task or args.train or args.val):
        raise ValueError("finetune: give either --tasks YAML (multi-task) or --task/--train/--val (one task), not both")
    if not args.tasks and not (args.task and args.train):
        raise ValueError("finetune: give --task and --train (one task), or --tasks YAML (multi-task)")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")


def _finetune(args) -> int:
    import torch

    from hyena_glt import HyenaGLTConfig
    from hyena_glt.heads import HEAD_MODELS, HyenaGLTMultiTask, TaskSpec
    from hyena_glt.model import CONFIG_NAME

    from .finetune_trainer import DataParallel, Finetuner, FinetuneJob

    _check_args(args)
    dp = DataParallel()
    torch.manual_seed(args.seed)
    say = partial(print, flush=True) if dp.rank == 0 else (lambda *_: None)
    try:
        if args.tasks:
            spec = MultiTaskFile.load(args.tasks)
            data = {name: prepare_task(t.kind, t.train, t.val, args.max_len) for name, t in spec.tasks.items()}
            tasks = {n: TaskSpec(d.kind, d.num_labels, spec.tasks[n].weight, d.label_names) for n, d in data.items()}
            config_file = Path(args.model) / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"--model {args.model}: no {CONFIG_NAME}; expected a pretrained model directory")
            model = HyenaGLTMultiTask(HyenaGLTConfig.from_json(config_file), tasks, dropout=args.dropout)
            model.load_backbone(args.model)
            job = FinetuneJob(model, tasks, data, multi=True, fingerprint={"tasks": spec.model_dump()})
            say(f"finetune multi-task: {len(tasks)} tasks on one backbone, {model.num_parameters():,} parameters")
        else:
            d = prepare_task(args.task, args.train, args.val, args.max_len)
            model = HEAD_MODELS[args.task].from_pretrained(args.model, num_labels=d.num_labels, dropout=args.dropout,
                                                           label_names=d.label_names)
            if model.label_names is None and d.label_names:
                model.label_names = d.label_names
            tasks, data = {args.task: TaskSpec(d.kind, d.num_labels, 1.0, d.label_names)}, {args.task: d}
            job = FinetuneJob(model, tasks, data, multi=False,
                              fingerprint={"task": args.task, "train": args.train, "val": args.val})
            say(f"finetune {args.task}: {model.num_parameters():,} parameters")
        job.fingerprint.update(model=str(Path(args.model).resolve()), max_len=args.max_len, dropout=args.dropout,
                               weight_decay=args.weight_decay)
        for n, d in data.items():
            say(f"  {f'{n}: {d.kind}, ' if args.tasks else ''}{len(d.train)} train / {len(d.val) if d.val else 0} val "
                f"sequences, {d.num_labels} output(s){' ' + str(d.label_names) if d.label_names else ''}"
                + (f", weight {tasks[n].weight:g}" if args.tasks else ""))
        trainer = Finetuner(job, args, dp)
        say(f"  {trainer.total} steps on {dp.world} process(es), global batch {args.batch_size}")
        return trainer.run()
    finally:
        dp.close()


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
