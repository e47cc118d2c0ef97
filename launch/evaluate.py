"""`hyena-glt eval` and `hyena-glt embed` on a converted (single-device) model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

LN2 = math.log(2)


def fasta_windows(path: Path, seq_len: int) -> Iterator[tuple[str, bytes, int]]:
    """(record id, window, seq type) for non-overlapping windows of every record; the last,
    shorter window of a record is kept (padded by the batcher, its padding weighs 0)."""
    from data_tools.fasta import check_file, read_records

    check = check_file(path)
    check.raise_if_bad()
    for rec in read_records(path, lambda: check):
        for start in range(0, len(rec.seq), seq_len):
            yield rec.id, rec.seq[start : start + seq_len], int(rec.seq_type)


def _batches(data: str, split: str, seq_len: int, batch_size: int, max_windows: int | None,
             soft_mask_weight: float) -> Iterator[dict]:
    from data_tools.batching import make_batch
    from data_tools.loader import eval_batches

    path = Path(data)
    if (path / "manifest.json").is_file():
        yield from eval_batches(path, seq_len, batch_size, split=split, soft_mask_weight=soft_mask_weight,
                                max_samples=max_windows)
        return
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: neither a packed directory (manifest.json) nor a FASTA file")
    buf: list[tuple[bytes, int]] = []
    for n, (_, seq, seq_type) in enumerate(fasta_windows(path, seq_len)):
        if max_windows is not None and n >= max_windows:
            break
        buf.append((seq, seq_type))
        if len(buf) == batch_size:
            yield make_batch(buf, seq_len, soft_mask_weight)
            buf = []
    if buf:
        yield make_batch(buf, seq_len, soft_mask_weight)


@torch.no_grad()
def evaluate_model(model, batches) -> dict:
    """Token-weighted loss, bits per base, and the number of bases scored."""
    model.eval()
    loss_sum = weight = 0.0
    bases = 0
    for mb in batches:
        out = model(mb["input_ids"], labels=mb["labels"], loss_weights=mb["loss_weights"], seq_type=mb.get("seq_type"))
        loss_sum += out.loss_sum.item()
        weight += out.weight_sum.item()
        bases += int((mb["loss_weights"] > 0).sum())
    loss = loss_sum / max(weight, 1e-12)
    return {"loss": loss, "bits_per_base": loss / LN2, "bases": bases}


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss and bits/base of a converted model on packed windows or a FASTA file")
    p.add_argument("--model", required=True, help="directory with config.json + model.safetensors")
    p.add_argument("--data", required=True, help="a packed directory (hyena-glt pack) or a FASTA file")
    p.add_argument("--split", default="val", help="split of a packed directory (default val)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the pack's, or 1024 for FASTA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--soft-mask-weight", type=float, default=None, help="default: the model config's")
    p.set_defaults(func=_eval_cmd)

    p = sub.add_parser("embed", help="per-sequence embeddings (mean of the final hidden states) to .npy")
    p.add_argument("--model", required=True, help="any saved model directory (language model, head or multi-task)")
    p.add_argument("--input", required=True, help="FASTA file (one embedding per record, first --seq-len bases)")
    p.add_argument("--out", required=True, help="output .npy (N, d_model); record ids go to OUT.ids.txt")
    p.add_argument("--seq-len", type=int, default=1024)
    p.set_defaults(func=_embed_cmd)


def _seq_len_of(data: str, given: int | None) -> int:
    if given:
        return given
    manifest = Path(data) / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["options"]["seq_len"])
    return 1024


def _eval_cmd(args) -> int:
    from hyena_glt import load_causal_lm

    model = load_causal_lm(args.model)
    smw = model.config.soft_mask_weight if args.soft_mask_weight is None else args.soft_mask_weight
    seq_len = _seq_len_of(args.data, args.seq_len)
    result = evaluate_model(model, _batches(args.data, args.split, seq_len, args.batch_size, args.max_windows, smw))
    if result["bases"] == 0:
        raise ValueError(f"--data {args.data}: no windows in split {args.split!r}")
    print(json.dumps({**result, "seq_len": seq_len, "model": args.model, "data": args.data}))
    return 0


@torch.no_grad()
def _embed_cmd(args) -> int:
    from data_tools.batching import make_batch
    from data_tools.fasta import check_file, read_records
    from hyena_glt import load_backbone

    backbone = load_backbone(args.model).eval()  # a language model, a head or a multi-task model
    ids, vecs = [], []
    check = check_file(Path(args.input))
    check.raise_if_bad()
    for rec in read_records(Path(args.input), lambda: check):
        mb = make_batch([(rec.seq[: args.seq_len], int(rec.seq_type))], args.seq_len, 1.0)
        hidden = backbone(mb["input_ids"], seq_type=mb["seq_type"])
        mask = mb["input_ids"] >= 4  # byte positions (not BOS, not padding)
        vecs.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).squeeze(0).numpy())
        ids.append(rec.id)
    if not ids:
        raise ValueError(f"--input {args.input}: no sequences")
    np.save(args.out, np.stack(vecs).astype(np.float32))
    Path(str(args.out) + ".ids.txt").write_text("\n".join(ids) + "\n")
    print(f"wrote {len(ids)} embeddings of size {vecs[0].shape[0]} to {args.out}")
    return 0
