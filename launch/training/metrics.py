"""metrics.jsonl (one JSON object per line, flushed each step) and a rank-0 progress bar.

A resumed run first drops the lines of the steps it is about to redo (truncate_after), so a
kill + resume leaves exactly one line per step."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

LN2 = math.log(2)


def truncate_after(path: str | Path, step: int, keep_evals_at_step: bool = True) -> int:
    """Rewrite metrics.jsonl without the records of steps after `step` (and, unless
    `keep_evals_at_step`, without the evaluation records of `step` itself: a final evaluation
    that the resumed run repeats), and without lines cut short by a kill. Atomic (a temporary
    file renamed over it). Returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        s = record.get("step") if isinstance(record, dict) else None
        if isinstance(s, int) and (s > step or (s == step and "loss" not in record and not keep_evals_at_step)):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dropped


class MetricsLog:
    """`append`: continue the file; `resume_step`: continue it after dropping what comes after
    that step (see truncate_after; `keep_evals_at_step` is passed on)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, append: bool = False, tensorboard: bool = False,
                 resume_step: int | None = None, keep_evals_at_step: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self.dropped = 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self.dropped = truncate_after(self.path, resume_step, keep_evals_at_step)
                append = True
            self._f = open(self.path, "a" if append else "w")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
                except ImportError:
                    print("tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def progress(total: int, initial: int, enabled: bool, desc: str):
    """tqdm on a terminal; None otherwise (then the trainer prints plain log lines)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
