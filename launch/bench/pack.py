"""`hyena-glt bench pack`: Mbp/s of `pack` with 1 and 2 workers beside the speed of only
reading the same FASTA with pyfastx (the practical ceiling) and of pack's own reader (one
pass that checks the file and returns its records), in one run on one machine, so the
ratios are meaningful.

Default input: a collection of genome files, 4 copies of the bundled genomes as 12
separate files (22 Mbp), the shape of a real corpus (many bacterial-size files), where
`--workers` shares whole files; `--copies 1` packs the bundled genomes alone, where one
file holds 84 % of the bases and a second worker cannot help (see docs/data.md).

Every case is timed in a fresh interpreter that imports what `hyena-glt pack` imports and
nothing else (no torch, which the benchmark command itself has loaded): forking pack's
workers from a process that holds torch costs several times more. Only the work is timed:
each pack writes into a new directory under $TMPDIR that is deleted after its time is
taken. The packs' manifests (which hold the sha256 of every shard and index) are compared
across worker counts, so a run also shows the output does not depend on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "genomes"


def add_arguments(p) -> None:
    p.add_argument("--inputs", nargs="+", default=[str(BUNDLED)], help="FASTA inputs (default: the bundled genomes)")
    p.add_argument("--copies", type=int, default=4,
                   help="pack N copies of the inputs as separate files (default 4: a 12-file collection of the "
                        "bundled genomes; 1 packs the inputs alone)")
    p.add_argument("--seq-len", type=int, default=8192, help="pack window length (default 8192, pack's default)")
    p.add_argument("--reverse-complement", choices=("none", "both"), default="none")
    p.add_argument("--shard-size-mb", type=float, default=256.0,
                   help="pack shard size (default 256, pack's default: the per-byte costs of a real pack, where "
                        "creating a shard's files is rare; small shards add those costs, which depend on the "
                        "file system: ~0.02-0.7 ms per file created here)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported (default 5)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(args) -> int:
    from data_tools.fasta import discover_inputs

    if args.copies < 1 or args.repeats < 1 or min(args.workers) < 1:
        raise ValueError("--copies, --repeats and --workers must be >= 1")
    sources = discover_inputs(args.inputs)
    with tempfile.TemporaryDirectory() as tmp:
        files = sources
        if args.copies > 1:
            files = [Path(shutil.copyfile(f, Path(tmp) / f"copy{c}-{f.name}")) for c in range(args.copies) for f in sources]
        spec = {"files": [str(f) for f in files], "seq_len": args.seq_len, "reverse_complement": args.reverse_complement,
                "shard_size_mb": args.shard_size_mb, "workers": args.workers, "repeats": args.repeats}
        child = subprocess.run([sys.executable, "-c", "from launch.bench.pack import time_cases; time_cases()"],
                               input=json.dumps(spec), capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"bench pack: the timing process failed:\n{child.stderr}")
        measured = json.loads(child.stdout)
    return _report(args, sources, files, measured)


def time_cases() -> None:
    """The timing process: reads the cases from stdin, writes their median times to stdout."""
    spec = json.load(sys.stdin)
    import pyfastx

    from data_tools.fasta import FastaReader, check_file
    from data_tools.pack import PackOptions, pack_job

    files = [Path(f) for f in spec["files"]]
    bases = sum(check_file(f).bases for f in files)
    manifests: dict[int, set[str]] = {}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def read():
        def all_records():
            for f in files:
                for _name, seq in pyfastx.Fastx(str(f), format="fasta", uppercase=False):
                    len(seq)

        return timed(all_records)

    def check_and_read():
        return timed(lambda: [None for f in files for _rec in FastaReader(f)])

    def pack(workers: int):
        def run_once():
            out = tempfile.mkdtemp(prefix="bench-pack-")
            try:
                opts = PackOptions(inputs=[str(f) for f in files], out=out, seq_len=spec["seq_len"],
                                   reverse_complement=spec["reverse_complement"],
                                   shard_size_mb=spec["shard_size_mb"], workers=workers, progress="none")
                with contextlib.redirect_stderr(io.StringIO()):
                    seconds = timed(lambda: pack_job(opts))
                manifests.setdefault(workers, set()).add(
                    hashlib.sha256((Path(out) / "manifest.json").read_bytes()).hexdigest())
                return seconds
            finally:
                shutil.rmtree(out)

        return run_once

    cases = [read, check_and_read] + [pack(w) for w in spec["workers"]]
    # The cases take turns, so that a slow moment of the machine does not fall on one case only.
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(spec["repeats"]):
        for case, ts in zip(cases, times):
            ts.append(case())
    json.dump({
        "bases": bases, "seconds": [statistics.median(ts) for ts in times],
        "same_output": len(set().union(*manifests.values())) == 1, "torch_loaded": "torch" in sys.modules,
        "pyfastx": pyfastx.__version__ if hasattr(pyfastx, "__version__") else pyfastx.version(),
    }, sys.stdout)


def _report(args, sources: list[Path], files: list[Path], measured: dict) -> int:
    bases = measured["bases"]
    names = ["read only (pyfastx.Fastx)", "pack's reader (check + records)"]
    names += [f"pack --workers {w}" for w in args.workers]
    rows = list(zip(names, measured["seconds"]))
    ceiling = bases / rows[0][1]
    results = [{"case": name, "seconds": round(t, 4), "mbp_per_s": round(bases / t / 1e6, 1),
                "ratio_to_read": round(bases / t / ceiling, 3)} for name, t in rows]
    one = next((t for w, (_, t) in zip(args.workers, rows[2:]) if w == 1), None)
    for w, r, (_, t) in zip(args.workers, results[2:], rows[2:]):
        if one is not None:
            r["speedup_over_1_worker"] = round(one / t, 3)
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "pyfastx": measured["pyfastx"]}
    inputs = f"{len(files)} file(s): " + (f"{args.copies} copies of " if args.copies > 1 else "") + \
        ", ".join(f.name for f in sources)
    report = {"bases": bases, "inputs": inputs, "files": [str(f) for f in files], "copies": args.copies,
              "seq_len": args.seq_len, "tmpdir": tempfile.gettempdir(), "shard_size_mb": args.shard_size_mb,
              "reverse_complement": args.reverse_complement, "repeats": args.repeats, "machine": machine,
              "timed_without_torch": not measured["torch_loaded"], "same_output_for_every_worker_count":
              measured["same_output"], "results": results}
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"pack benchmark: {inputs}; {bases / 1e6:.2f} Mbp, seq_len {args.seq_len}, shard_size_mb "
          f"{args.shard_size_mb}, reverse_complement {args.reverse_complement}, median of {args.repeats}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; shards written under "
          f"{tempfile.gettempdir()}; timed in a process without torch: {not measured['torch_loaded']}; "
          f"same output for every worker count: {measured['same_output']}")
    print(f"{'case':<38} {'seconds':>8} {'Mbp/s':>8} {'x read':>7} {'x 1 worker':>10}")
    for r in results:
        speedup = f"{r['speedup_over_1_worker']:>10.2f}" if "speedup_over_1_worker" in r else ""
        print(f"{r['case']:<38} {r['seconds']:>8.3f} {r['mbp_per_s']:>8.1f} {r['ratio_to_read']:>7.3f} {speedup}")
    print(json.dumps(report))
    return 0
