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
The loop (data parallel under torchrun, checkpoints, --resume) is finetune_trainer.py; data
encoding and batching is finetune_data.py; what depends on the task kind (seq-cls, token-cls,
regression) is the kind's entry in hyena_glt.heads.TASK_KINDS.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launch.args import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def register(sub) -> None:
    from hyena_glt.heads import TASK_KINDS
    from launch.checkpoint.publish import add_replace_option
    from launch.training.watchdog import DEFAULT_TIMEOUT as DEFAULT_PEER_TIMEOUT

    kinds = ", ".join(TASK_KINDS)
    p = sub.add_parser("finetune", help=f"fine-tune a task head ({kinds}) on a pretrained model",
                       description="Fine-tune a task head on a pretrained model; prints its task kind's metrics "
                       "(accuracy/MCC/F1, MSE/Pearson).")
    p.add_argument("--model", required=True, help="pretrained model dir (config.json + model.safetensors)")
    p.add_argument("--task", choices=list(TASK_KINDS), help="one task (with --train)")
    p.add_argument("--train", help="CSV/TSV (sequence,label) or FASTA with labels in headers")
    p.add_argument("--tasks", metavar="YAML", help="multi-task: named tasks (kind, train, val, weight) on one backbone")
    p.add_argument("--val", help="validation file (same formats); metrics are printed after each epoch")
    p.add_argument("--out", default="runs/finetune",
                   help="where the fine-tuned model is saved (published whole when the run ends; OUT/checkpoint "
                   "holds the run's checkpoints)")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data (multi-task: all tasks' batches)")
    p.add_argument("--max-steps", type=nonnegative_int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    p.add_argument("--dropout", type=fraction, default=0.1)
    p.add_argument("--max-len", type=positive_int, default=1024, help="longer sequences are truncated to this many bases")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--save-every", type=nonnegative_int, default=0, help="checkpoint every N steps (always at each epoch end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    add_replace_option(p, "--out")
    p.add_argument("--exit-after-steps", type=nonnegative_int, default=0,
                   help="save a checkpoint and exit after N steps of this run (then --resume)")
    p.add_argument("--peer-timeout-s", type=nonnegative_float, default=DEFAULT_PEER_TIMEOUT,
                   help="under torchrun: seconds without a heartbeat from a rank before every rank stops, naming it "
                   "and its host (as train.peer_timeout_s); 0: off")
    p.set_defaults(func=_finetune)

    p = sub.add_parser(
        "predict", help="predict with a fine-tuned model",
        description="Predict labels or values: a TSV with a header, one row per sequence (the --input records "
        "in file order, then the --sequence ones). Classification: the predicted label and one probability "
        "column per class, named p_LABEL; token classification: one label per base; regression: the value. "
        "Without --output the table (and, when every input is labelled, a metrics line) goes to stdout; with "
        "--output it goes to the file and one summary line to stderr.")
    p.add_argument("--model", required=True, help="directory written by `hyena-glt finetune`")
    p.add_argument("--task", help="multi-task model: which task's head predicts")
    p.add_argument("--input", help="CSV/TSV/FASTA (labels optional; if all present, metrics are printed)")
    p.add_argument("--sequence", action="append", default=[], help="a sequence to predict (repeatable)")
    p.add_argument("--output", help="write the predictions as TSV to this file instead of stdout")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-len", type=positive_int, default=1024,
                   help="longer sequences are truncated to this many bases")
    p.set_defaults(func=_predict)


def _check_kind(kind: str) -> str:
    from hyena_glt.heads import task_kind

    return task_kind(kind).name


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="a task kind: a key of hyena_glt.heads.TASK_KINDS")
    train: str = Field(description="training file (CSV/TSV/FASTA); relative paths are read from the YAML's folder")
    val: str | None = Field(None, description="validation file, same formats")
    weight: float = Field(1.0, gt=0, description="sampling weight: the share of steps that train this task")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return _check_kind(kind)


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
    import torch.distributed as dist

    from hyena_glt import HyenaGLTConfig
    from hyena_glt.heads import HyenaGLTMultiTask, TaskSpec, head_model_class
    from hyena_glt.model import CONFIG_NAME
    from launch.finetune.data import prepare_task
    from launch.finetune.trainer import FinetuneJob, Finetuner, start_data_parallel
    from launch.training.watchdog import PeerWatchdog, describe_hosts, gather_hosts
    from megatron_adapters.groups import destroy_parallel

    _check_args(args)
    config_file = Path(args.model) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"--model {args.model}: no {CONFIG_NAME}; expected a pretrained model directory")
    if args.tasks:
        spec = MultiTaskFile.load(args.tasks)
        data = {name: prepare_task(t.kind, t.train, t.val, args.max_len) for name, t in spec.tasks.items()}
        tasks = {n: TaskSpec(d.kind, d.num_labels, spec.tasks[n].weight, d.label_names) for n, d in data.items()}
        fingerprint = {"tasks": spec.model_dump()}
    else:
        d = prepare_task(args.task, args.train, args.val, args.max_len)
        tasks, data = {args.task: TaskSpec(d.kind, d.num_labels, 1.0, d.label_names)}, {args.task: d}
        fingerprint = {"task": args.task, "train": args.train, "val": args.val}
    fingerprint.update(model=str(Path(args.model).resolve()), max_len=args.max_len, dropout=args.dropout,
                       weight_decay=args.weight_decay)
    ctx = start_data_parallel(HyenaGLTConfig.from_json(config_file))
    watchdog = None
    try:
        if dist.get_world_size() > 1:
            hosts = gather_hosts()
            if ctx.rank == 0:
                print(f"hosts: {describe_hosts(hosts)}", flush=True)
            watchdog = PeerWatchdog.start(args.peer_timeout_s, hosts)
        torch.manual_seed(args.seed)
        say = partial(print, flush=True) if ctx.rank == 0 else (lambda *_: None)
        if args.tasks:
            model = HyenaGLTMultiTask(HyenaGLTConfig.from_json(config_file), tasks, dropout=args.dropout)
            model.load_backbone(args.model)
            say(f"finetune multi-task: {len(tasks)} tasks on one backbone, {model.num_parameters():,} parameters")
        else:
            model = head_model_class(args.task).from_pretrained(args.model, num_labels=d.num_labels, dropout=args.dropout,
                                                                label_names=d.label_names)
            if model.label_names is None and d.label_names:
                model.label_names = d.label_names
            say(f"finetune {args.task}: {model.num_parameters():,} parameters")
        for n, d in data.items():
            say(f"  {f'{n}: {d.kind}, ' if args.tasks else ''}{len(d.train)} train / {len(d.val) if d.val else 0} val "
                f"sequences, {d.num_labels} output(s){' ' + str(d.label_names) if d.label_names else ''}"
                + (f", weight {tasks[n].weight:g}" if args.tasks else ""))
        trainer = Finetuner(FinetuneJob(model, tasks, data, multi=bool(args.tasks), fingerprint=fingerprint), args, ctx)
        say(f"  {trainer.total} steps on {trainer.world} process(es), global batch {args.batch_size}")
        return trainer.run()
    except Exception as e:
        if watchdog is not None:
            watchdog.failed(e)  # a lost peer: named by the watchdog; this rank's own error: told to the others
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
        destroy_parallel()


def _predict(args) -> int:
    import sys

    import torch

    from data_tools.labelled import LabelledRecord, read_labelled
    from hyena_glt.heads import (
        TASKS_NAME,
        HyenaGLTMultiTask,
        TaskSpec,
        load_head_model,
        task_kind,
    )
    from hyena_glt.multitask import MultiTaskMetrics
    from launch.finetune.data import collate, encode_examples, fmt_metrics

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
        head, spec = args.task, model.tasks[args.task]
    else:
        model = load_head_model(args.model).eval()
        spec = TaskSpec(model.task, model.num_labels, label_names=model.label_names)
        if args.task is not None:
            raise ValueError(f"predict --task: {args.model} is a single-task ({model.task}) model; drop --task")
    kind, name = task_kind(spec.kind), head or spec.kind
    records = read_labelled(args.input, require_labels=False) if args.input else []
    records += [LabelledRecord(f"seq{i + 1}", s, None) for i, s in enumerate(args.sequence)]
    examples = encode_examples(records, spec.kind, spec.label_names, args.max_len, args.input or "--sequence")
    metrics = MultiTaskMetrics({name: spec})
    rows = []
    with torch.no_grad():
        for i in range(0, len(examples), args.batch_size):
            chunk = examples[i : i + args.batch_size]
            ids, labels = collate(chunk, spec.kind)
            logits = (model(ids) if head is None else model(ids, task=head)).logits
            if labels is not None:
                metrics.update(name, logits, labels)
            for j, (x, _) in enumerate(chunk):
                rows.append([records[i + j].id, *kind.format_output(logits[j], len(x), spec.label_names).split("\t")])
    classes = spec.label_names or [str(k) for k in range(spec.num_labels)]
    header, rows = _class_columns(["id", *kind.output_header.split("\t")], rows, classes)
    table = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"
    scored = records and all(r.label is not None for r in records)
    summary = "metrics: " + fmt_metrics(metrics.compute()[name], spec.kind) if scored else ""
    if args.output:
        Path(args.output).write_text(table)
        task = f" (task {head})" if head else ""
        print(f"predict: wrote {len(rows)} prediction(s){task} to {args.output}" + (f"; {summary}" if summary else ""),
              file=sys.stderr)
    else:
        sys.stdout.write(table)
        if summary:
            print(summary)
    return 0


def _class_columns(header: list[str], rows: list[list[str]], classes: list[str]) -> tuple[list[str], list[list[str]]]:
    """`predict`'s table with every column that holds one number per class (comma-separated in
    the task kind's output, e.g. seq-cls's probabilities) split into one column per class, named
    by the class: p_LABEL for probabilities, COLUMN_LABEL otherwise. Other columns are kept."""

    def per_class(cell: str) -> bool:
        parts = cell.split(",")
        try:
            [float(x) for x in parts]
        except ValueError:
            return False
        return len(parts) == len(classes)

    split = [k for k in range(1, len(header))
             if len(classes) > 1 and rows and all(len(r) == len(header) and per_class(r[k]) for r in rows)]
    if not split:
        return header, rows
    out_header: list[str] = []
    for k, col in enumerate(header):
        prefix = "p" if col == "probabilities" else col
        out_header += [f"{prefix}_{c}" for c in classes] if k in split else [col]
    return out_header, [[x for k, cell in enumerate(r) for x in (cell.split(",") if k in split else [cell])]
                        for r in rows]
