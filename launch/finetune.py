"""`hyena-glt finetune` and `hyena-glt predict`: task heads on a pretrained model.

    hyena-glt finetune --model PRETRAINED_DIR --task seq-cls --train train.csv --val val.csv --out runs/ft
    hyena-glt predict --model runs/ft --input new.fasta

Data: CSV/TSV (`sequence,label`) or FASTA with labels in the headers (data_tools/labelled.py).
Classification prints accuracy, MCC and F1; regression prints MSE and Pearson r.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a task head (seq-cls, token-cls, regression) on a pretrained model",
                       description="Fine-tune a task head on a pretrained model; prints accuracy/MCC/F1 or MSE/Pearson.")
    p.add_argument("--model", required=True, help="pretrained model dir (config.json + model.safetensors)")
    p.add_argument("--task", required=True, choices=["seq-cls", "token-cls", "regression"])
    p.add_argument("--train", required=True, help="CSV/TSV (sequence,label) or FASTA with labels in headers")
    p.add_argument("--val", help="validation file (same formats); metrics are printed after each epoch")
    p.add_argument("--out", default="runs/finetune", help="where the fine-tuned model is saved")
    p.add_argument("--epochs", type=int, default=3)
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


def evaluate(model, examples, task: str, batch_size: int) -> dict:
    import torch

    from hyena_glt.heads import classification_metrics, regression_metrics

    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, lab = collate(examples[i : i + batch_size], task)
            logits = model(ids).logits
            preds.append((logits.float() if task == "regression" else logits.argmax(-1)).reshape(-1))
            labels.append(lab.reshape(-1))
    model.train()
    p, y = torch.cat(preds), torch.cat(labels)
    return regression_metrics(p, y) if task == "regression" else classification_metrics(p, y, model.num_labels)


def _fmt(m: dict) -> str:
    keys = ("mse", "pearson") if "mse" in m else ("accuracy", "mcc", "f1")
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys) + f"  (n={m['n']})"


# ---- commands ----
def _finetune(args) -> int:
    import torch

    from data_tools.labelled import read_labelled, token_labels
    from hyena_glt.heads import HEAD_MODELS

    from .optim import build_adamw, lr_at

    for name in ("epochs", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    torch.manual_seed(args.seed)
    train_records = read_labelled(args.train)
    val_records = read_labelled(args.val) if args.val else None
    if args.task == "seq-cls":
        label_names = _sort_labels(r.label for r in train_records)
    elif args.task == "token-cls":
        label_names = _sort_labels(t for r in train_records for t in token_labels(r.label, len(r.sequence), f"{args.train}: {r.id}"))
    else:
        label_names = None
    num_labels = 1 if args.task == "regression" else len(label_names)
    if args.task != "regression" and num_labels < 2:
        raise ValueError(f"{args.train}: need at least two different labels for {args.task}, found {label_names}")
    train = encode_examples(train_records, args.task, label_names, args.max_len, args.train)
    val = encode_examples(val_records, args.task, label_names, args.max_len, args.val) if val_records else None

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
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(n, 1), "seconds": time.perf_counter() - t0}
        line = f"epoch {epoch}  step {step}  train_loss {record['train_loss']:.4f}"
        if val:
            record["val"] = evaluate(model, val, args.task, args.batch_size)
            line += "  val " + _fmt(record["val"])
        print(line, flush=True)
        history.append(record)
        if step >= total:
            break
    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    (out_dir / "finetune_metrics.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"saved the fine-tuned model to {out_dir}")
    return 0


def _predict(args) -> int:
    import torch

    from data_tools.labelled import LabelledRecord, read_labelled
    from hyena_glt.heads import load_head_model

    if not args.input and not args.sequence:
        raise ValueError("predict: give --input FILE or one or more --sequence SEQ")
    model = load_head_model(args.model).eval()
    task = model.task
    records = read_labelled(args.input, require_labels=False) if args.input else []
    records += [LabelledRecord(f"seq{i + 1}", s, None) for i, s in enumerate(args.sequence)]
    names = model.label_names
    examples = encode_examples(records, task, names, args.max_len, args.input or "--sequence")
    lines = []
    with torch.no_grad():
        for i in range(0, len(examples), args.batch_size):
            chunk = examples[i : i + args.batch_size]
            ids, _ = collate(chunk, task)
            logits = model(ids).logits
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
        print("metrics: " + _fmt(evaluate(model, examples, task, args.batch_size)))
    return 0
