"""Sequence-length warm-up (curriculum) for the trainer config's `train.curriculum.*`.

Training starts on short sequences and grows to `train.seq_len` over `warmup_steps`:

    train:
      seq_len: 8192
      curriculum:
        enabled: true
        start_seq_len: 512
        warmup_steps: 1000
        schedule: geometric   # or linear
        multiple_of: 256      # every length a multiple (static shapes); itself a multiple of 2*cp
        mode: split           # split: (B, L) -> (B*L/s, s), same tokens per step; truncate: first s

`seq_len_at(step, cfg)` is the length of a 1-based step; `apply_curriculum(batch, s)` reshapes
a loader batch (dict of (B, L) tensors, labels already shifted) to that length. The trainer
calls both each step; the loader keeps producing full-length windows, so data order,
checkpoints and resumption do not depend on the curriculum.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class CurriculumConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    start_seq_len: int = Field(256, ge=2, description="sequence length at step 1")
    warmup_steps: int = Field(0, ge=0, description="steps to reach train.seq_len (0: full length from the start)")
    schedule: str = Field("linear", description="'linear' or 'geometric' growth")
    multiple_of: int = Field(64, ge=1, description="lengths are rounded down to a multiple of this")
    mode: str = Field("split", description="'split' (keep tokens per step) or 'truncate'")
    final_seq_len: int | None = Field(None, ge=2, description="end length; default train.seq_len")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        if v not in ("linear", "geometric"):
            raise ValueError(f"schedule: must be 'linear' or 'geometric', got {v!r}")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("split", "truncate"):
            raise ValueError(f"mode: must be 'split' or 'truncate', got {v!r}")
        return v


def validate_curriculum(cur: CurriculumConfig, seq_len: int, cp: int = 1) -> None:
    """Start-up checks against the training length (and context parallel size): ValueError naming the field."""
    if not cur.enabled:
        return
    final = cur.final_seq_len or seq_len
    if final > seq_len:
        raise ValueError(f"curriculum.final_seq_len: {final} exceeds train.seq_len={seq_len}")
    if cur.start_seq_len > final:
        raise ValueError(f"curriculum.start_seq_len: {cur.start_seq_len} exceeds the final length {final}")
    if cur.start_seq_len < cur.multiple_of:
        raise ValueError(f"curriculum.start_seq_len: {cur.start_seq_len} is below multiple_of={cur.multiple_of}")
    if final % cur.multiple_of:
        raise ValueError(f"curriculum.multiple_of: {cur.multiple_of} must divide the final length {final}")
    # Every curriculum length is a multiple of multiple_of, so it must pass the layout's
    # sequence-length rule (check_layout asks the same one at each step).
    from megatron_adapters.parallel_config import zigzag_chunks, zigzag_splits

    if not zigzag_splits(cur.multiple_of, cp):
        raise ValueError(f"curriculum.multiple_of: {cur.multiple_of} must be a multiple of 2*cp={zigzag_chunks(cp)} "
                         f"(every curriculum length is cut into 2*cp zigzag chunks; parallel.cp={cp})")
    if cur.mode == "split" and seq_len % cur.multiple_of:
        raise ValueError(f"curriculum.multiple_of: {cur.multiple_of} must divide train.seq_len={seq_len} in split mode")


def _resolve(cfg, seq_len: int | None) -> tuple[CurriculumConfig, int]:
    """Accepts a CurriculumConfig (plus seq_len) or any object with `.curriculum` and `.seq_len`
    (the trainer's `train` section)."""
    if isinstance(cfg, CurriculumConfig):
        cur = cfg
    else:
        cur = getattr(cfg, "curriculum", None)
        if isinstance(cur, dict):
            cur = CurriculumConfig(**cur)
        if cur is None:
            return CurriculumConfig(), int(seq_len or cfg.seq_len)
        seq_len = seq_len or getattr(cfg, "seq_len", None)
    final = cur.final_seq_len or seq_len
    if final is None:
        raise ValueError("seq_len: give the training sequence length (or curriculum.final_seq_len)")
    return cur, int(final)


def seq_len_at(step: int, cfg, seq_len: int | None = None) -> int:
    """Sequence length of 1-based `step`: start_seq_len at step 1, the final length from step
    warmup_steps + 1 on, linear or geometric in between, rounded down to multiple_of (never
    below start_seq_len). Non-decreasing in step."""
    cur, final = _resolve(cfg, seq_len)
    if not cur.enabled or cur.warmup_steps == 0 or step > cur.warmup_steps:
        return final
    start = min(cur.start_seq_len, final)
    frac = max(0, step - 1) / cur.warmup_steps
    if cur.schedule == "linear":
        length = start + (final - start) * frac
    else:
        length = start * (final / start) ** frac
    length = int(math.floor(length + 1e-9)) // cur.multiple_of * cur.multiple_of
    length = min(final, max(start, length))
    if cur.mode == "split":
        # Lengths that divide the final length split every window without a remainder.
        ok = [d for d in range(cur.multiple_of, final + 1, cur.multiple_of) if final % d == 0]
        below = [d for d in ok if start <= d <= length]
        length = below[-1] if below else min((d for d in ok if d >= start), default=length)
    return int(length)


def apply_curriculum(batch: dict, length: int, mode: str = "split") -> dict:
    """Cut every (B, L) tensor of a batch to `length` positions. split: (B, L) -> (B * L//length,
    length) (each window's labels stay aligned because they are already shifted); truncate:
    the first `length` positions. Other entries (e.g. (B,) seq_type) are repeated to match."""
    ids = batch["input_ids"]
    B, L = ids.shape
    if length >= L:
        return batch
    if mode == "truncate":
        return {k: (v[:, :length] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (B, L) else v)
                for k, v in batch.items()}
    if mode != "split":
        raise ValueError(f"mode: must be 'split' or 'truncate', got {mode!r}")
    n = L // length
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (B, L):
            out[k] = v[:, : n * length].reshape(B * n, length, *v.shape[2:])
        elif torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == B:
            out[k] = v.repeat_interleave(n, dim=0)
        else:
            out[k] = v
    return out
