"""`hyena-glt eval`, `score` and `embed` on a converted (single-device) model.

All three run a sequence of any length in chunks (`--chunk-size`), carrying the inference
cache from chunk to chunk (hyena_glt.inference): memory is bounded by the chunk (plus
attention's K/V cache, `--kv-dtype`) and the results equal the one-pass forward. By default
the chunk comes from the model (`auto_chunk_size`): a sequence that fits the memory budget
runs in one pass. Token-merging models have no cache and run in one pass. Progress is counted
in bases, chunk by chunk (`--progress`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_tools.progress import Progress
from launch.args import fraction, layer_index, nonnegative_int, positive_int

LN2 = math.log(2)
# The default chunk: a sequence runs in one pass when its forward fits this many bytes.
STREAM_BUDGET_BYTES = 1 << 30
MIN_AUTO_CHUNK = 1024
KV_DTYPE_CHOICES = ("auto", "float32", "bfloat16")


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
def evaluate_model(model, batches, chunk_size: int | str | None = None, kv_dtype: torch.dtype | None = None,
                   progress: Progress | None = None) -> dict:
    """Token-weighted loss, bits per base, and the number of bases scored. `chunk_size`:
    positions per chunk, None for one pass, "auto" for `auto_chunk_size` of each batch.
    `progress` advances by each chunk's bases (padding not counted)."""
    from hyena_glt.inference import stream_logprobs
    from hyena_glt.tokenizer import PAD_ID

    model.eval()
    loss_sum = weight = 0.0
    bases = 0
    for mb in batches:
        B, L = mb["input_ids"].shape
        chunk = auto_chunk_size(model.config, B, L) if chunk_size == "auto" else chunk_size
        real = mb["labels"] != PAD_ID
        tick = None if progress is None else (lambda s, e, real=real: progress.update(int(real[:, s:e].sum())))
        logp = stream_logprobs(model, mb["input_ids"], mb["labels"], chunk, seq_type=mb.get("seq_type"),
                               kv_dtype=kv_dtype, progress=tick)
        w = mb["loss_weights"].double()
        if not model.config.bos_token:  # the first base of each window has no context to be scored from
            w[:, 0] = 0.0
        loss_sum -= float((logp.double() * w).sum())
        weight += float(w.sum())
        bases += int((w > 0).sum())
    loss = loss_sum / max(weight, 1e-12)
    return {"loss": loss, "bits_per_base": loss / LN2, "bases": bases}


def _fasta(path: str):
    """(the file's check: records and bases, the records), the file checked first."""
    from data_tools.fasta import check_file, read_records

    check = check_file(Path(path))
    check.raise_if_bad()
    return check, read_records(Path(path), lambda: check)


def stream_bytes_per_position(config) -> int:
    """Bytes a chunk holds per position at its peak, estimated from the model: (40 x d_model
    + 2 x vocab_size) 4-byte values (the layers' projections, convolutions, states and MLP, and
    the logits with their log-softmax, taken in fp32 whatever the model's dtype). Measured on
    the tiny models (d_model 64, fp32, 1 thread): 3.6 KB per position in one pass (64K, 256K),
    about 10 KB per position of a chunk that continues a cached prefix (chunks of 32K to 128K),
    under this estimate's 12.3 KB; attention's K/V cache comes on top (`--kv-dtype`)."""
    return 4 * (40 * config.d_model + 2 * config.vocab_size)


def auto_chunk_size(config, batch: int = 1, length: int | None = None,
                    budget_bytes: int = STREAM_BUDGET_BYTES) -> int | None:
    """The default `--chunk-size`: N = the largest power of two <= budget / (batch x
    `stream_bytes_per_position`), at least MIN_AUTO_CHUNK. A sequence of at most N positions
    runs in one pass (returns None with `length` <= N); a longer one in chunks of N (the
    tiny models: N = 65536 at batch 1). Chunks cost what one pass costs (attention over the
    cached prefix runs unmasked through the fused kernels), so this never trades speed for
    memory; it only keeps a long sequence's activations within the budget."""
    per_row = budget_bytes // max(1, batch * stream_bytes_per_position(config))
    n = max(MIN_AUTO_CHUNK, 1 << max(0, per_row.bit_length() - 1))
    return None if length is not None and length <= n else n


def _chunk_size(model, given: int | None, what: str) -> int | str | None:
    """`--chunk-size` as given; None (the default) -> "auto" (`auto_chunk_size` per sequence)."""
    if given is not None and given < 1:
        raise ValueError(f"--chunk-size: must be >= 1, got {given}")
    if not getattr(model, "supports_cache", hasattr(model, "extend")):
        if given:
            print(f"hyena-glt {what}: note: {type(model).__name__} (token merging) has no inference cache; "
                  "each sequence runs in one pass", file=sys.stderr)
        return None
    return "auto" if given is None else given


def _kv_dtype(model, name: str) -> torch.dtype | None:
    from hyena_glt.cache import kv_dtype

    return kv_dtype(name, next(model.parameters()).dtype)


class BaseProgress(Progress):
    """data_tools' Progress (a tqdm bar in bases on a terminal, a log line every 10 s in a
    job's log) with the log line in the units a model's speed needs (bp, kbp, Mbp):
    `score: 0.52/1.06 Mbp (49%), 12.3 kbp/s, ETA 0:00:44`."""

    def close(self) -> None:
        if sys.exc_info()[0] is not None and self.bar is None:
            return  # closed by a failing command: its one-line error is the last word, not a progress line
        super().close()

    def log_line(self) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / dt
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _eta(max(self.total - self.done, 0) / rate) if rate > 0 else "?"
        unit, scale = _unit(max(self.total, self.done))
        amount = f"{self.done:,}/{self.total:,}" if scale == 1 else f"{self.done / scale:.2f}/{self.total / scale:.2f}"
        rate_unit, rate_scale = _unit(rate)
        print(f"{self.desc}: {amount} {unit} ({pct:.0f}%), {rate / rate_scale:.{0 if rate_scale == 1 else 1}f} "
              f"{rate_unit}/s, ETA {eta}", file=self.stream, flush=True)


def _unit(n: float) -> tuple[str, float]:
    for unit, scale in (("Gbp", 1e9), ("Mbp", 1e6), ("kbp", 1e3)):
        if n >= scale:
            return unit, scale
    return "bp", 1


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress(total: int, desc: str, mode: str) -> Progress | None:
    return None if mode == "none" else BaseProgress(total, desc, mode)


def _close(progress: Progress | None, failed: bool = False) -> None:
    """End the bar; a failed run ends it without the final log line, so that the error is the
    one line it prints (a terminal's bar stays where it stopped)."""
    if progress is None:
        return
    if not failed:
        progress.close()
    elif progress.bar is not None:
        progress.bar.close()


class _RecordTicks:
    """progress(start, end) of a stream over one record of `bases` bases, whose positions
    may include BOS: the bar advances by the record's bases, chunk by chunk."""

    def __init__(self, progress: Progress | None, bases: int):
        self.progress, self.bases, self.done = progress, bases, 0

    def __call__(self, start: int, end: int) -> None:
        upto = min(end, self.bases)
        if self.progress is not None and upto > self.done:
            self.progress.update(upto - self.done)
        self.done = max(self.done, upto)

    def finish(self) -> None:
        self(0, self.bases)


def _stream_args(p, what: str) -> None:
    """--chunk-size, --kv-dtype and --progress, the same for eval, score and embed."""
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help=f"positions per chunk with the inference cache (any length; the result equals one pass). "
                   f"Default: from the model, N = the largest power of two <= 1 GiB / (batch x 4 bytes x "
                   f"(40 x d_model + 2 x vocab_size)), at least {MIN_AUTO_CHUNK}: {what} of up to N positions "
                   "run in one pass, longer ones in chunks of N (tiny model: N = 65536)")
    p.add_argument("--kv-dtype", choices=KV_DTYPE_CHOICES, default="auto",
                   help="dtype of attention's K/V cache between chunks: auto = the model's; bfloat16 halves its "
                   "memory (cost measured in docs/inference.md)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="progress in bases with bases/s on stderr, updated per chunk: a bar on a terminal, a "
                   "log line every 10 s otherwise (auto)")


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
    _stream_args(p, "batches of windows")
    p.add_argument("--no-verify-shards", dest="verify_shards", action="store_false", default=None,
                   help="packed data: skip checking each shard against the manifest's sha256 on first use "
                   "(also HYENA_GLT_VERIFY_SHARDS=0)")
    p.set_defaults(func=_eval_cmd)

    p = sub.add_parser("score", help="log-likelihood of every FASTA record, of any length, streamed in chunks",
                       description="Per-sequence log-likelihood (nats) and bits/base of each record under the model, "
                       "computed --chunk-size positions at a time with the inference cache (equal to one pass; "
                       "by default one pass when the record fits the memory budget).")
    p.add_argument("--model", required=True, help="a saved language model directory (either family)")
    p.add_argument("--input", required=True, help="FASTA(.gz) file; each record is scored whole")
    p.add_argument("--out", required=True, help="output TSV: id, bases, log_likelihood, bits_per_base")
    _stream_args(p, "records")
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
    p.add_argument("--layer", type=layer_index, default=None,
                   help="output of this block (0-based; negative from the end) instead of the final hidden states")
    p.add_argument("--per-base", action="store_true", help="one vector per base instead of the mean")
    _stream_args(p, "records")
    p.set_defaults(func=_embed_cmd)


def _seq_len_of(data: str, given: int | None) -> int:
    if given:
        return given
    if (Path(data) / "manifest.json").is_file():
        from data_tools.manifest import load_manifest

        return int(load_manifest(data)["options"]["seq_len"])
    return 1024


def _eval_total(data: str, split: str, seq_len: int, max_windows: int | None) -> int:
    """The bases `eval` will score, for the progress bar: a pack's windows x seq_len, a FASTA's
    bases (both capped by --max-windows)."""
    path = Path(data)
    if (path / "manifest.json").is_file():
        from data_tools.manifest import load_manifest

        windows = sum(int(s["samples"]) for s in load_manifest(path)["shards"] if s["split"] == split)
        return min(windows, max_windows or windows) * seq_len
    if not path.is_file():
        return 0
    from data_tools.fasta import check_file

    bases = check_file(path).bases
    return bases if max_windows is None else min(bases, max_windows * seq_len)


def _eval_cmd(args) -> int:
    from hyena_glt import load_causal_lm

    model = load_causal_lm(args.model)
    chunk = _chunk_size(model, args.chunk_size, "eval")
    smw = model.config.soft_mask_weight if args.soft_mask_weight is None else args.soft_mask_weight
    seq_len = _seq_len_of(args.data, args.seq_len)
    batches = _batches(args.data, args.split, seq_len, args.batch_size, args.max_windows, smw, args.verify_shards)
    bar = _progress(_eval_total(args.data, args.split, seq_len, args.max_windows), "eval", args.progress)
    try:
        result = evaluate_model(model, batches, chunk, _kv_dtype(model, args.kv_dtype), bar)
        if result["bases"] == 0:
            raise ValueError(f"--data {args.data}: no windows in split {args.split!r}")
    except BaseException:
        _close(bar, failed=True)
        raise
    _close(bar)
    print(json.dumps({**result, "seq_len": seq_len, "model": args.model, "data": args.data}))
    return 0


def _score_cmd(args) -> int:
    from data_tools.batching import make_batch
    from hyena_glt import load_causal_lm
    from hyena_glt.inference import stream_logprobs

    model = load_causal_lm(args.model).eval()
    chunk = _chunk_size(model, args.chunk_size, "score")
    kv = _kv_dtype(model, args.kv_dtype)
    per_base = Path(args.per_base) if args.per_base else None
    if per_base:
        per_base.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    n = total_bases = 0
    check, records = _fasta(args.input)
    bar = _progress(check.bases, "score", args.progress)
    try:
        with open(tmp, "w") as f:
            f.write("id\tbases\tlog_likelihood\tbits_per_base\n")
            for rec in records:
                mb = make_batch([(rec.seq, int(rec.seq_type))], len(rec.seq), 1.0)  # every base weighs 1 here
                ticks = _RecordTicks(bar, len(rec.seq))
                c = auto_chunk_size(model.config, 1, len(rec.seq)) if chunk == "auto" else chunk
                logp = stream_logprobs(model, mb["input_ids"], mb["labels"], c, seq_type=mb["seq_type"],
                                       kv_dtype=kv, progress=ticks)[0]
                ticks.finish()
                ll = float(logp.double().sum())
                scored = len(rec.seq) - (0 if model.config.bos_token else 1)  # no BOS: the first base is not scored
                f.write(f"{rec.id}\t{len(rec.seq)}\t{ll:.6f}\t{-ll / max(scored, 1) / LN2:.6f}\n")
                if per_base:
                    np.save(per_base / f"{n}.npy", logp.numpy().astype(np.float32))
                n += 1
                total_bases += len(rec.seq)
        if n == 0:
            raise ValueError(f"--input {args.input}: no sequences")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed run (bad input, full disk) leaves no partial output
        _close(bar, failed=True)
        raise
    _close(bar)
    tmp.replace(out)
    print(f"scored {n} sequence(s), {total_bases:,} bases, to {out}" + (f" (per-base in {per_base})" if per_base else ""))
    return 0


@torch.no_grad()
def _embed_cmd(args) -> int:
    from hyena_glt import ByteTokenizer, load_backbone
    from hyena_glt.inference import stream_hidden

    backbone = load_backbone(args.model).eval()  # a language model, a head or a multi-task model
    chunk = _chunk_size(backbone, args.chunk_size, "embed")
    kv = _kv_dtype(backbone, args.kv_dtype)
    if args.seq_len < 0:
        raise ValueError(f"--seq-len: must be >= 0, got {args.seq_len}")
    out = Path(args.out)
    if args.per_base:
        out.mkdir(parents=True, exist_ok=True)
    ids, vecs = [], []
    check, records = _fasta(args.input)
    bar = _progress(check.bases, "embed", args.progress)
    try:
        for rec in records:
            seq = rec.seq[: args.seq_len] if args.seq_len else rec.seq
            bos = backbone.config.bos_token
            tokens = ByteTokenizer().encode(seq, add_bos=bos).ids[None]  # [BOS] + every base
            c = auto_chunk_size(backbone.config, 1, tokens.shape[1]) if chunk == "auto" else chunk
            ticks = _RecordTicks(bar, len(rec.seq))
            shift = 1 if bos else 0  # position p has read base p - 1 after BOS
            hidden = stream_hidden(backbone, tokens, c, args.layer, seq_type=torch.tensor([int(rec.seq_type)]),
                                   kv_dtype=kv, progress=lambda s, e, t=ticks, k=shift: t(max(0, s - k), max(0, e - k)))
            ticks.finish()  # the whole record counts (bases past --seq-len were skipped, not left)
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
        else:
            np.save(out, np.stack(vecs).astype(np.float32))
            Path(str(out) + ".ids.txt").write_text("\n".join(ids) + "\n")
    except BaseException:
        _close(bar, failed=True)
        raise
    _close(bar)
    if args.per_base:
        print(f"wrote per-base embeddings of {len(ids)} sequence(s) to {out}/<i>.npy")
    else:
        print(f"wrote {len(ids)} embeddings of size {vecs[0].shape[0]} to {out}")
    return 0
