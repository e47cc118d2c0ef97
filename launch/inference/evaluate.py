"""`hyena-glt eval`, `score` and `embed` on a converted (single-device) model.

All three can run a sequence of any length in chunks (`--chunk-size`), carrying the
inference cache from chunk to chunk (hyena_glt.inference): memory is bounded by the chunk
(plus attention's K/V cache) and the results equal the one-pass forward. Token-merging
models have no cache and run in one pass.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from launch.args import fraction, nonnegative_int, positive_int

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
             soft_mask_weight: float, verify_shards: bool | None = None) -> Iterator[dict]:
    from data_tools.batching import make_batch
    from data_tools.loader import eval_batches

    path = Path(data)
    if (path / "manifest.json").is_file():
        yield from eval_batches(path, seq_len, batch_size, split=split, soft_mask_weight=soft_mask_weight,
                                max_samples=max_windows, verify_shards=verify_shards)
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
def evaluate_model(model, batches, chunk_size: int | None = None) -> dict:
    """Token-weighted loss, bits per base, and the number of bases scored."""
    from hyena_glt.inference import stream_logprobs

    model.eval()
    loss_sum = weight = 0.0
    bases = 0
    for mb in batches:
        logp = stream_logprobs(model, mb["input_ids"], mb["labels"], chunk_size, seq_type=mb.get("seq_type"))
        w = mb["loss_weights"].double()
        if not model.config.bos_token:  # the first base of each window has no context to be scored from
            w[:, 0] = 0.0
        loss_sum -= float((logp.double() * w).sum())
        weight += float(w.sum())
        bases += int((w > 0).sum())
    loss = loss_sum / max(weight, 1e-12)
    return {"loss": loss, "bits_per_base": loss / LN2, "bases": bases}


def _records(path: str):
    from data_tools.fasta import check_file, read_records

    check = check_file(Path(path))
    check.raise_if_bad()
    yield from read_records(Path(path), lambda: check)


def _chunk_size(model, given: int | None, what: str) -> int | None:
    if given is not None and given < 1:
        raise ValueError(f"--chunk-size: must be >= 1, got {given}")
    if given and not getattr(model, "supports_cache", hasattr(model, "extend")):
        print(f"hyena-glt {what}: note: {type(model).__name__} (token merging) has no inference cache; "
              "each sequence runs in one pass", file=sys.stderr)
        return None
    return given


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss and bits/base of a converted model on packed windows or a FASTA file")
    p.add_argument("--model", required=True, help="directory with config.json + model.safetensors")
    p.add_argument("--data", required=True, help="a packed directory (hyena-glt pack) or a FASTA file")
    p.add_argument("--split", default="val", help="split of a packed directory (default val)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="window length (default: the pack's, or 1024 for FASTA)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-windows", type=positive_int, default=None, help="score at most this many windows")
    p.add_argument("--soft-mask-weight", type=fraction, default=None, help="default: the model config's")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help="run each window in chunks of this many positions with the inference cache (any window length)")
    p.add_argument("--no-verify-shards", dest="verify_shards", action="store_false", default=None,
                   help="packed data: skip checking each shard against the manifest's sha256 on first use "
                   "(also HYENA_GLT_VERIFY_SHARDS=0)")
    p.set_defaults(func=_eval_cmd)

    p = sub.add_parser("score", help="log-likelihood of every FASTA record, of any length, streamed in chunks",
                       description="Per-sequence log-likelihood (nats) and bits/base of each record under the model, "
                       "computed --chunk-size positions at a time with the inference cache (equal to one pass).")
    p.add_argument("--model", required=True, help="a saved language model directory (either family)")
    p.add_argument("--input", required=True, help="FASTA(.gz) file; each record is scored whole")
    p.add_argument("--out", required=True, help="output TSV: id, bases, log_likelihood, bits_per_base")
    p.add_argument("--chunk-size", type=positive_int, default=8192,
                   help="positions per chunk (memory bound); default 8192")
    p.add_argument("--per-base", metavar="DIR", help="also write each record's per-base log-probabilities to DIR/<i>.npy")
    p.set_defaults(func=_score_cmd)

    p = sub.add_parser("embed", help="per-sequence (mean) or per-base embeddings of any saved model to .npy",
                       description="Embeddings of each FASTA record: the mean over its bases (default) or every "
                       "base (--per-base), of the final hidden states or of one block's output (--layer).")
    p.add_argument("--model", required=True, help="any saved model directory (language model, head or multi-task)")
    p.add_argument("--input", required=True, help="FASTA file")
    p.add_argument("--out", required=True, help="pooled: OUT.npy (N, d_model) + OUT.ids.txt; --per-base: a directory "
                   "of <i>.npy (L_i, d_model) + ids.txt")
    p.add_argument("--seq-len", type=nonnegative_int, default=0,
                   help="embed only the first N bases of each record (0: all)")
    p.add_argument("--layer", type=int, default=None,
                   help="output of this block (0-based; negative from the end) instead of the final hidden states")
    p.add_argument("--per-base", action="store_true", help="one vector per base instead of the mean")
    p.add_argument("--chunk-size", type=positive_int, default=8192, help="positions per chunk with the inference cache")
    p.set_defaults(func=_embed_cmd)


def _seq_len_of(data: str, given: int | None) -> int:
    if given:
        return given
    if (Path(data) / "manifest.json").is_file():
        from data_tools.manifest import load_manifest

        return int(load_manifest(data)["options"]["seq_len"])
    return 1024


def _eval_cmd(args) -> int:
    from hyena_glt import load_causal_lm

    model = load_causal_lm(args.model)
    chunk = _chunk_size(model, args.chunk_size, "eval")
    smw = model.config.soft_mask_weight if args.soft_mask_weight is None else args.soft_mask_weight
    seq_len = _seq_len_of(args.data, args.seq_len)
    batches = _batches(args.data, args.split, seq_len, args.batch_size, args.max_windows, smw, args.verify_shards)
    result = evaluate_model(model, batches, chunk)
    if result["bases"] == 0:
        raise ValueError(f"--data {args.data}: no windows in split {args.split!r}")
    print(json.dumps({**result, "seq_len": seq_len, "model": args.model, "data": args.data}))
    return 0


def _score_cmd(args) -> int:
    from tqdm import tqdm

    from data_tools.batching import make_batch
    from hyena_glt import load_causal_lm
    from hyena_glt.inference import stream_logprobs

    model = load_causal_lm(args.model).eval()
    chunk = _chunk_size(model, args.chunk_size, "score")
    per_base = Path(args.per_base) if args.per_base else None
    if per_base:
        per_base.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    n = total_bases = 0
    try:
        with open(tmp, "w") as f, tqdm(unit="bp", unit_scale=True, desc="score", leave=False) as bar:
            f.write("id\tbases\tlog_likelihood\tbits_per_base\n")
            for rec in _records(args.input):
                mb = make_batch([(rec.seq, int(rec.seq_type))], len(rec.seq), 1.0)  # every base weighs 1 here
                logp = stream_logprobs(model, mb["input_ids"], mb["labels"], chunk, seq_type=mb["seq_type"])[0]
                ll = float(logp.double().sum())
                scored = len(rec.seq) - (0 if model.config.bos_token else 1)  # no BOS: the first base is not scored
                f.write(f"{rec.id}\t{len(rec.seq)}\t{ll:.6f}\t{-ll / max(scored, 1) / LN2:.6f}\n")
                if per_base:
                    np.save(per_base / f"{n}.npy", logp.numpy().astype(np.float32))
                n += 1
                total_bases += len(rec.seq)
                bar.update(len(rec.seq))
        if n == 0:
            raise ValueError(f"--input {args.input}: no sequences")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed run (bad input, full disk) leaves no partial output
        raise
    tmp.replace(out)
    print(f"scored {n} sequence(s), {total_bases:,} bases, to {out}" + (f" (per-base in {per_base})" if per_base else ""))
    return 0


@torch.no_grad()
def _embed_cmd(args) -> int:
    from hyena_glt import ByteTokenizer, load_backbone
    from hyena_glt.inference import stream_hidden

    backbone = load_backbone(args.model).eval()  # a language model, a head or a multi-task model
    chunk = _chunk_size(backbone, args.chunk_size, "embed")
    if args.seq_len < 0:
        raise ValueError(f"--seq-len: must be >= 0, got {args.seq_len}")
    out = Path(args.out)
    if args.per_base:
        out.mkdir(parents=True, exist_ok=True)
    ids, vecs = [], []
    for rec in _records(args.input):
        seq = rec.seq[: args.seq_len] if args.seq_len else rec.seq
        bos = backbone.config.bos_token
        tokens = ByteTokenizer().encode(seq, add_bos=bos).ids[None]  # [BOS] + every base
        hidden = stream_hidden(backbone, tokens, chunk, args.layer, seq_type=torch.tensor([int(rec.seq_type)]))
        hidden = hidden[0, 1:].float() if bos else hidden[0].float()  # one state per base, after reading it
        if args.per_base:
            np.save(out / f"{len(ids)}.npy", hidden.numpy())
        else:
            vecs.append(hidden.mean(0).numpy())
        ids.append(rec.id)
    if not ids:
        raise ValueError(f"--input {args.input}: no sequences")
    if args.per_base:
        (out / "ids.txt").write_text("\n".join(ids) + "\n")
        print(f"wrote per-base embeddings of {len(ids)} sequence(s) to {out}/<i>.npy")
        return 0
    np.save(out, np.stack(vecs).astype(np.float32))
    Path(str(out) + ".ids.txt").write_text("\n".join(ids) + "\n")
    print(f"wrote {len(ids)} embeddings of size {vecs[0].shape[0]} to {out}")
    return 0
