"""`hyena-glt bench pack`: Mbp/s of `pack` with 1 and 2 workers beside the speed of only
reading the same FASTA with pyfastx (the practical ceiling) and of pack's own reader (one
pass that checks the file and returns its records), in one run on one machine, so the
ratios are meaningful. Shards are written under the temporary directory ($TMPDIR)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "genomes"


def add_arguments(p) -> None:
    p.add_argument("--inputs", nargs="+", default=[str(BUNDLED)], help="FASTA inputs (default: the bundled genomes)")
    p.add_argument("--seq-len", type=int, default=8192, help="pack window length (default 8192, pack's default)")
    p.add_argument("--reverse-complement", choices=("none", "both"), default="none")
    p.add_argument("--shard-size-mb", type=float, default=0.5,
                   help="pack shard size (default 0.5: the 4.7 Mbp bundled genomes make ~10 shards, so a second "
                        "worker has shards to write; at pack's default of 256 there is only one)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported (default 5)")
    p.add_argument("--copies", type=int, default=1,
                   help="pack N copies of the inputs (as separate files), so fixed start-up costs such as "
                        "forking the worker pool weigh less (default 1)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _median_times(cases: list, repeats: int) -> list[float]:
    """Median wall time of each case, the cases taking turns so that a slow moment of the
    machine does not fall on one case only."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for fn, ts in zip(cases, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def run(args) -> int:
    from data_tools.fasta import discover_inputs

    with tempfile.TemporaryDirectory() as tmp:
        files = discover_inputs(args.inputs)
        if args.copies > 1:
            files = [_copy(f, Path(tmp) / f"copy{c}-{f.name}") for c in range(args.copies) for f in files]
        return _run(args, files)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _run(args, files) -> int:
    import pyfastx
    import webdataset

    from data_tools.fasta import FastaReader, check_file
    from data_tools.pack import PackOptions, pack_job

    bases = sum(check_file(f).bases for f in files)

    def read():
        for f in files:
            for _name, seq in pyfastx.Fastx(str(f), format="fasta", uppercase=False):
                len(seq)

    def check_and_read():
        for f in files:
            for _rec in FastaReader(f):
                pass

    def pack(workers: int):
        def run_once():
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
                pack_job(PackOptions(inputs=[str(f) for f in files], out=out, seq_len=args.seq_len,
                                     reverse_complement=args.reverse_complement, shard_size_mb=args.shard_size_mb,
                                     workers=workers, progress="none"))

        return run_once

    names = ["read only (pyfastx.Fastx)", "pack's reader (check + records)"]
    names += [f"pack --workers {w}" for w in args.workers]
    times = _median_times([read, check_and_read] + [pack(w) for w in args.workers], args.repeats)
    rows = list(zip(names, times))
    ceiling = bases / rows[0][1]
    results = [{"case": name, "seconds": round(t, 4), "mbp_per_s": round(bases / t / 1e6, 1),
                "ratio_to_read": round(bases / t / ceiling, 3)} for name, t in rows]
    machine = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "pyfastx": pyfastx.__version__ if hasattr(pyfastx, "__version__") else pyfastx.version(),
        "webdataset": getattr(webdataset, "__version__", "?"),
    }
    report = {"bases": bases, "files": [str(f) for f in files], "copies": args.copies, "seq_len": args.seq_len,
              "tmpdir": tempfile.gettempdir(),
              "shard_size_mb": args.shard_size_mb,
              "reverse_complement": args.reverse_complement, "repeats": args.repeats, "machine": machine,
              "results": results}
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"pack benchmark: {len(files)} file(s) ({args.copies} cop{'y' if args.copies == 1 else 'ies'} of the inputs), "
          f"{bases / 1e6:.2f} Mbp, seq_len {args.seq_len}, "
          f"shard_size_mb {args.shard_size_mb}, reverse_complement {args.reverse_complement}, median of {args.repeats}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; shards written under "
          f"{tempfile.gettempdir()}")
    print(f"{'case':<38} {'seconds':>8} {'Mbp/s':>8} {'x read':>7}")
    for r in results:
        print(f"{r['case']:<38} {r['seconds']:>8.3f} {r['mbp_per_s']:>8.1f} {r['ratio_to_read']:>7.3f}")
    print(json.dumps(report))
    return 0
