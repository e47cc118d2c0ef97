"""`hyena-glt bench pack`: Mbp/s of `pack` with 1 and 2 workers beside the speed of only
reading the same FASTA with pyfastx (the practical ceiling) and of pack's own reader (one
pass that checks the file and returns its records), in one run on one machine, so the
ratios are meaningful.

Default inputs: two collections of genome files, 4 and 32 copies of the bundled genomes as
12 and 96 separate files (22 and 178 Mbp), the shape of a real corpus (many bacterial-size
files), where `--workers` shares whole files. The small one shows what starting and
finishing a pack cost (~20-30 ms: forking workers, the last file's write and hash, the
manifests); the large one, throughput. `--copies 1` packs the bundled genomes alone, where
one file holds 84 % of the bases and a second worker cannot help (see docs/data.md).

Every case is timed in a fresh interpreter that imports what `hyena-glt pack` imports and
nothing else (no torch, which the benchmark command itself has loaded): forking pack's
workers from a process that holds torch costs several times more. Only the work is timed:
each pack writes into a new directory under $TMPDIR that is deleted after its time is
taken. The cases take turns, and the speed-up of 2 workers is also given as the median of
each turn's own ratio (`paired`), which a slow minute of a shared machine moves less than a
ratio of medians. The CPU time the hypervisor gave to other guests while a case ran
(`steal`, from /proc/stat) says how much of a run's noise came from outside. The packs'
manifests (which hold the sha256 of every shard and index) are compared across worker
counts, so a run also shows the output does not depend on them.
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

from launch.args import positive_float, positive_int

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "genomes"


def add_arguments(p) -> None:
    p.add_argument("--inputs", nargs="+", default=[str(BUNDLED)], help="FASTA inputs (default: the bundled genomes)")
    p.add_argument("--copies", type=positive_int, nargs="+", default=[4, 32],
                   help="collections to time: N copies of the inputs as separate files, one collection per N "
                        "(default 4 32: 12 and 96 files of the bundled genomes, 22 and 178 Mbp; 1 packs the "
                        "inputs alone)")
    p.add_argument("--seq-len", type=positive_int, default=8192, help="pack window length (pack's default)")
    p.add_argument("--reverse-complement", choices=("none", "both"), default="none")
    p.add_argument("--shard-size-mb", type=positive_float, default=256.0,
                   help="pack shard size (pack's default: the per-byte costs of a real pack, where "
                        "creating a shard's files is rare; small shards add those costs, which depend on the "
                        "file system: ~0.02-0.7 ms per file created here)")
    p.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per case; the median is reported")


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

    if min(args.copies) < 1 or args.repeats < 1 or min(args.workers) < 1:
        raise ValueError("--copies, --repeats and --workers must be >= 1")
    sources = discover_inputs(args.inputs)
    collections = []
    for copies in args.copies:
        with tempfile.TemporaryDirectory() as tmp:
            files = sources
            if copies > 1:
                files = [Path(shutil.copyfile(f, Path(tmp) / f"copy{c}-{f.name}")) for c in range(copies) for f in sources]
            spec = {"files": [str(f) for f in files], "seq_len": args.seq_len,
                    "reverse_complement": args.reverse_complement, "shard_size_mb": args.shard_size_mb,
                    "workers": args.workers, "repeats": args.repeats}
            child = subprocess.run([sys.executable, "-c", "from launch.bench.pack import time_cases; time_cases()"],
                                   input=json.dumps(spec), capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"bench pack: the timing process failed:\n{child.stderr}")
            collections.append(_collection(args, copies, sources, files, json.loads(child.stdout)))
    return _report(args, collections)


def _steal_seconds() -> float | None:
    """CPU time the hypervisor has given to other guests (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def time_cases() -> None:
    """The timing process: reads the cases from stdin, writes each case's times to stdout."""
    spec = json.load(sys.stdin)
    from multiprocessing import get_context

    import pyfastx

    from data_tools.fasta import FastaReader, check_file
    from data_tools.pack import PackOptions, pack_job
    from data_tools.windows import assign_files

    files = [Path(f) for f in spec["files"]]
    bases = sum(check_file(f).bases for f in files)
    manifests: dict[int, set[str]] = {}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def read_all(share):
        for f in share:
            for _name, seq in pyfastx.Fastx(str(f), format="fasta", uppercase=False):
                len(seq)

    def read(processes: int):
        """Read only, the files shared out whole among `processes` forked processes as pack
        shares them among its workers: what this machine gives that many readers now."""
        if processes == 1:
            return lambda: timed(lambda: read_all(files))
        owners = assign_files([f.stat().st_size for f in files], processes)
        shares = [[f for f, (j,) in zip(files, owners) if j == k] for k in range(processes)]
        fork = get_context("fork")

        def run_once():
            procs = [fork.Process(target=read_all, args=(share,)) for share in shares]
            t = time.perf_counter()
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            seconds = time.perf_counter() - t
            if any(proc.exitcode for proc in procs):
                raise RuntimeError("bench pack: a reading process failed")
            return seconds

        return run_once

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

    cases = [("read only (pyfastx.Fastx)", read(1))]
    cases += [(f"read only, {w} processes", read(w)) for w in spec["workers"] if w > 1]
    cases += [("pack's reader (check + records)", check_and_read)]
    cases += [(f"pack --workers {w}", pack(w)) for w in spec["workers"]]
    # The cases take turns, so that a slow moment of the machine does not fall on one case only.
    runs: list[list[float]] = [[] for _ in cases]
    steal = [0.0 for _ in cases] if _steal_seconds() is not None else None
    for _ in range(spec["repeats"]):
        for k, (_name, case) in enumerate(cases):
            before = _steal_seconds()
            runs[k].append(case())
            if steal is not None:
                steal[k] += _steal_seconds() - before
    json.dump({
        "bases": bases, "cases": [name for name, _ in cases], "runs": runs, "steal_seconds": steal,
        "same_output": len(set().union(*manifests.values())) == 1, "torch_loaded": "torch" in sys.modules,
        "pyfastx": pyfastx.__version__ if hasattr(pyfastx, "__version__") else pyfastx.version(),
    }, sys.stdout)


def _collection(args, copies: int, sources: list[Path], files: list[Path], measured: dict) -> dict:
    """One collection's results: speeds and ratios to the read-only speed; for N workers,
    the speed-up over 1 (of the medians, and the median of each turn's own ratio) beside
    what N reading processes got over one in the same turns (`machine_speedup`)."""
    bases = measured["bases"]
    runs = dict(zip(measured["cases"], measured["runs"]))
    seconds = {name: statistics.median(ts) for name, ts in runs.items()}
    ceiling = bases / seconds["read only (pyfastx.Fastx)"]
    steal = measured["steal_seconds"] or [None] * len(runs)
    results = [{"case": name, "seconds": round(seconds[name], 4), "mbp_per_s": round(bases / seconds[name] / 1e6, 1),
                "ratio_to_read": round(bases / seconds[name] / ceiling, 3),
                "steal_seconds": None if st is None else round(st, 3)}
               for name, st in zip(measured["cases"], steal)]

    def speedup(one: str, many: str) -> tuple[float, float]:
        paired = statistics.median(a / b for a, b in zip(runs[one], runs[many]))
        return round(seconds[one] / seconds[many], 3), round(paired, 3)

    by_case = {r["case"]: r for r in results}
    for w in args.workers if 1 in args.workers else ():
        r = by_case[f"pack --workers {w}"]
        r["speedup_over_1_worker"], r["paired_speedup_over_1_worker"] = speedup("pack --workers 1", r["case"])
        if w > 1:
            r["machine_speedup"], r["paired_machine_speedup"] = speedup(
                "read only (pyfastx.Fastx)", f"read only, {w} processes")
    return {"copies": copies, "bases": bases, "files": [str(f) for f in files],
            "inputs": f"{len(files)} file(s): " + (f"{copies} copies of " if copies > 1 else "")
            + ", ".join(f.name for f in sources),
            "timed_without_torch": not measured["torch_loaded"],
            "same_output_for_every_worker_count": measured["same_output"], "pyfastx": measured["pyfastx"],
            "results": results}


def _report(args, collections: list[dict]) -> int:
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "pyfastx": collections[0]["pyfastx"]}
    report = {"seq_len": args.seq_len, "tmpdir": tempfile.gettempdir(), "shard_size_mb": args.shard_size_mb,
              "reverse_complement": args.reverse_complement, "repeats": args.repeats, "machine": machine,
              "collections": collections}
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"pack benchmark: seq_len {args.seq_len}, shard_size_mb {args.shard_size_mb}, reverse_complement "
          f"{args.reverse_complement}, median of {args.repeats}; machine: {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}; shards written under {tempfile.gettempdir()}")
    for c in collections:
        print(f"\n{c['inputs']}; {c['bases'] / 1e6:.2f} Mbp; timed in a process without torch: "
              f"{c['timed_without_torch']}; same output for every worker count: "
              f"{c['same_output_for_every_worker_count']}")
        print(f"{'case':<34} {'seconds':>8} {'Mbp/s':>7} {'x read':>7} {'x 1 worker':>10} {'paired':>7} "
              f"{'machine':>8} {'steal s':>8}")
        for r in c["results"]:
            speedup = f"{r['speedup_over_1_worker']:>10.2f} {r['paired_speedup_over_1_worker']:>7.2f}" \
                if "speedup_over_1_worker" in r else f"{'':>10} {'':>7}"
            machine = f"{r['paired_machine_speedup']:>8.2f}" if "machine_speedup" in r else f"{'':>8}"
            steal = "" if r["steal_seconds"] is None else f"{r['steal_seconds']:>8.2f}"
            print(f"{r['case']:<34} {r['seconds']:>8.3f} {r['mbp_per_s']:>7.1f} {r['ratio_to_read']:>7.3f} {speedup} "
                  f"{machine} {steal}")
    print("\nx 1 worker: speed-up of the medians; paired: median of each turn's own speed-up; machine: the "
          "paired speed-up of as many processes only reading the same files, shared out the same way (what "
          "this machine gives that many processes now); steal s: CPU time the hypervisor gave to other guests "
          "during the case's runs")
    print(json.dumps(report))
    return 0
