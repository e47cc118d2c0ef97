"""Progress in bases: a tqdm bar on a terminal, a plain log line every few seconds in a
batch job's log file (where a redrawn bar would be thousands of carriage returns)."""

from __future__ import annotations

import io
import os
import sys
import time


def _fmt_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str, mode: str = "auto", every_s: float = 10.0, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.desc, self.total, self.done, self.every = mode, desc, total, 0, every_s
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            try:  # a pseudo-terminal may report a 0 x 0 size, and tqdm then draws nothing
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
                sized = False
            fixed = {} if sized else {"ncols": 100, "nrows": 24}
            self.bar = tqdm(
                total=total, desc=desc, unit="bp", unit_scale=True, unit_divisor=1000, file=self.stream,
                smoothing=0.1, dynamic_ncols=sized, **fixed,
            )

    def set_total(self, total: int) -> None:
        self.total = max(total, self.done)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def restart(self, total: int) -> None:
        """Count again from zero (the job plans its files again)."""
        self.done, self.total = 0, total
        if self.bar is not None:
            self.bar.reset(total=total)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log" and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.log_line()

    def log_line(self) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / dt
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _fmt_eta((self.total - self.done) / rate) if rate > 0 and self.total >= self.done else "?"
        print(
            f"{self.desc}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} Mbp ({pct:.0f}%), {rate / 1e6:.1f} Mbp/s, ETA {eta}",
            file=self.stream, flush=True,
        )

    def write(self, msg: str) -> None:
        """A message (shown in every mode) that does not break the bar."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "log":
            self.log_line()
