"""metrics.jsonl (one JSON object per line, flushed each step) and a rank-0 progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

LN2 = math.log(2)


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, append: bool = False, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
