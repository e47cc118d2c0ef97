"""Subcommands `hyena-glt pack` and `hyena-glt data stats`. Heavy imports stay inside the
handlers so `hyena-glt --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from launch.args import fraction, nonnegative_int, positive_float, positive_int

PACK_HELP = "pack FASTA files into webdataset tar shards with a manifest"
PACK_DESCRIPTION = """\
Cut FASTA records into fixed-length windows and write them as webdataset tar shards
DIR/{split}-{job:05d}-{shard:06d}.tar (+ a .idx per shard for random access) and
DIR/manifest.json. INPUT may be a FASTA file (plain, gzip or bgzip), a directory (searched
for *.fa/*.fasta/*.fna/...[.gz]), a glob, or a .txt/.list/.lst/.fofn file listing paths.

Exit codes: 0 all done; 1 done but some inputs were skipped (--skip-bad-files);
2 an error (a bad input without --skip-bad-files, bad options).
Under `mpiexec -n N` each rank packs its share (rank/size from MPI); in a SLURM array
(`sbatch --array=0-N`, launch/cluster/slurm_pack.sbatch) each task packs its share (index/count from
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT). --num-jobs/--job-index override both.
One run per job: a second run of a job into a DIR where it is running is refused (exit 2,
one line naming its host and PID; lock DIR/.pack/LOCK-job-NNNNN), and so is a pack with
other options; the lock of a run that is gone is taken over. While a pack runs, and after
it is killed, DIR has no manifest.json: the same command again completes it.
"""


def register(sub) -> None:
    p = sub.add_parser("pack", help=PACK_HELP, description=PACK_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="FASTA files, directories, globs or list files")
    p.add_argument("--out", metavar="DIR", help="output directory (required unless --finalize)")
    p.add_argument("--seq-len", type=positive_int, default=8192, help="window length in bases (default 8192)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="distance between window starts; < --seq-len makes windows overlap (default: --seq-len)")
    p.add_argument("--val-fraction", type=fraction, default=None,
                   help="fraction of records put in 'val' (with --split-by position: of each record's windows); "
                        "default 0.01, 0 with --val-regions")
    p.add_argument("--test-fraction", type=fraction, default=None,
                   help="fraction of records put in 'test' (with --split-by position: of each record's windows); "
                        "default 0")
    p.add_argument("--split-by", choices=("record", "position"), default=None,
                   help="record: each record goes whole to one split (default); position: the fractions are held out "
                        "of every record as one block of its windows at a seeded position, windows overlapping the "
                        "block dropped (for a genome of one or a few records)")
    p.add_argument("--val-regions", metavar="BED",
                   help="hold out these intervals (BED: record id, 0-based start, end) as 'val': windows overlapping "
                        "them go to val, windows overlapping those are dropped, the rest is train (--test-fraction "
                        "still takes whole records)")
    p.add_argument("--allow-empty-split", action="store_true",
                   help="write manifest.json (with a warning) even when a split given on the command line "
                        "(--val-fraction, --test-fraction, --split-by, --val-regions) comes out empty; without it "
                        "such a pack is refused (exit 2). Also with --finalize")
    p.add_argument("--reverse-complement", choices=("none", "both"), default="none",
                   help="'both' also writes every window's reverse complement (strand '-'); default none")
    p.add_argument("--max-n-fraction", type=fraction, default=0.1,
                   help="drop windows with a larger fraction of N (X for protein); default 0.1")
    p.add_argument("--min-len", type=nonnegative_int, default=64,
                   help="drop windows (record tails, short records) shorter than this; default 64")
    p.add_argument("--shard-size-mb", type=positive_float, default=256.0,
                   help="bases per shard, in millions (both strands counted); default 256")
    p.add_argument("--unit-mb", type=positive_float, default=16.0,
                   help="with fewer files than jobs, records are shared out between jobs in runs of "
                        "windows of about this many Mbp (default 16)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the record -> split assignment (default 0)")
    p.add_argument("--conservation", nargs="+", metavar="PATH",
                   help="per-base conservation tracks stored with every window: ID.npy files, .npz files (one "
                        "array per record id), bedGraph files (.bedGraph/.bg[.gz], chrom = record id), or "
                        "directories holding them; every packed record needs one (docs/data.md). Give it "
                        "after the inputs: it takes every path that follows")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip (and record in the manifest) input files that cannot be read; exit code 1")
    p.add_argument("--workers", type=positive_int, default=1, help="processes packing whole files on this machine (default 1; the output does not depend on it)")
    p.add_argument("--num-jobs", type=positive_int, default=None, help="number of jobs sharing the inputs (default: from MPI or the SLURM array, else 1)")
    p.add_argument("--job-index", type=nonnegative_int, default=None, help="this job's index in [0, --num-jobs)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="auto: a bar on a terminal, log lines otherwise")
    p.add_argument("--finalize", metavar="DIR", help="only merge the finished jobs' manifests in DIR into manifest.json")
    p.set_defaults(func=_pack)

    d = sub.add_parser("data", help="inspect packed datasets (stats, verify)")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    s = dsub.add_parser("stats", help="print a pack's totals; --verify checks every shard's sha256",
                        description="Print the totals of DIR/manifest.json; with --verify also check every "
                                    "shard (and index) against its sha256. Exit 1 if any is corrupt or missing.")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--verify", action="store_true", help="check every shard and index against the manifest's sha256")
    s.set_defaults(func=_stats)
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])


def _resolve_job(args):
    """(job index, number of jobs, the MPI ranks that agree over MPI or None): the flags,
    else MPI's rank/size, else the SLURM array task."""
    if args.num_jobs is not None or args.job_index is not None:
        if args.num_jobs is None or args.job_index is None:
            raise ValueError("--num-jobs and --job-index go together")
        return args.job_index, args.num_jobs, None
    from data_tools.mpi import mpi_job

    mpi = mpi_job()
    array = slurm_array_job()
    if mpi and mpi[1] > 1:
        if array and array[1] > 1:
            raise ValueError(f"both MPI ({mpi[1]} ranks) and a SLURM array ({array[1]} tasks) would split the work; "
                             "pass --num-jobs and --job-index")
        if mpi[2] is None and mpi[0] == 0:
            print(f"pack: {mpi[1]} MPI ranks without mpi4py: they agree through the file system (pip install "
                  "mpi4py to agree over MPI)", file=sys.stderr, flush=True)
        return mpi
    if array:
        print(f"pack: job {array[0]} of {array[1]} from SLURM_ARRAY_TASK_ID={os.environ['SLURM_ARRAY_TASK_ID']} "
              f"(SLURM_ARRAY_TASK_COUNT={array[1]})", file=sys.stderr, flush=True)
        return (*array, None)
    return 0, 1, None


def slurm_array_job() -> tuple[int, int] | None:
    """(index, count) of this SLURM array task, or None outside an array. Task ids need not
    start at 0 (`--array=1-64`) and may step (`--array=0-126:2`), but must be one evenly spaced
    range, since every index in [0, count) must be some task's share."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        last = int(env.get("SLURM_ARRAY_TASK_MAX", str(first + count - 1)))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
    except ValueError:
        raise ValueError("unreadable SLURM_ARRAY_TASK_* variables; pass --num-jobs and --job-index") from None
    index, off_grid = divmod(task - first, step)
    if off_grid or not 0 <= index < count or last != first + (count - 1) * step:
        raise ValueError(f"SLURM array task {task} (ids {first}-{last}:{step}, {count} tasks) is not one evenly spaced "
                         "range; submit --array=0-N, or pass --num-jobs and --job-index")
    return index, count


def _pack(args) -> int:
    if args.finalize:
        from data_tools.holdout import empty_splits, region_warnings
        from data_tools.manifest import try_finalize
        from data_tools.pack.job import split_counts

        merged = try_finalize(args.finalize, require=True, allow_empty_split=args.allow_empty_split)
        print(f"wrote {args.finalize}/manifest.json; {split_counts(merged['options'], merged['totals'])}")
        for warning in empty_splits(merged) + region_warnings(merged):
            print(f"warning: {warning}", file=sys.stderr)
        for s in merged["skipped_files"]:
            print(f"SKIPPED {s['path']}: {s['reason']}", file=sys.stderr)
        return 1 if merged["skipped_files"] else 0
    if not args.out:
        raise ValueError("--out DIR is required")
    if not args.inputs:
        raise ValueError("no INPUT given")
    from data_tools.pack import PackOptions, run_pack

    job_index, num_jobs, ranks = _resolve_job(args)
    # Splits named on the command line are asked for: one that comes out empty refuses the
    # pack; the default splits only warn (docs/data.md).
    asked = any(v is not None for v in (args.val_fraction, args.test_fraction, args.split_by, args.val_regions))
    opts = PackOptions(
        inputs=args.inputs, out=args.out, seq_len=args.seq_len, stride=args.stride,
        val_fraction=args.val_fraction if args.val_fraction is not None else (0.0 if args.val_regions else 0.01),
        test_fraction=args.test_fraction if args.test_fraction is not None else 0.0,
        split_by=args.split_by or "record", val_regions=args.val_regions,
        empty_split="refuse" if asked and not args.allow_empty_split else "warn",
        reverse_complement=args.reverse_complement, max_n_fraction=args.max_n_fraction,
        min_len=args.min_len, shard_size_mb=args.shard_size_mb, unit_mb=args.unit_mb, seed=args.seed,
        skip_bad_files=args.skip_bad_files, conservation=args.conservation, workers=args.workers,
        num_jobs=num_jobs, job_index=job_index,
        progress=args.progress,
    )
    return run_pack(opts, ranks)  # OSError (a full disk, no permission) -> one line from launch.cli, naming the file


def _stats(args) -> int:
    from data_tools.stats import print_stats

    return print_stats(args.dir, verify=args.verify)
