"""`hyena-glt bench TARGET`: benchmarks that measure side by side in one run.

Every benchmark lives in this package, one module per target, so the model package
(hyena_glt), the data tools and the trainer hold no benchmark code:

    ops     ops.py     fwd+bwd time and peak memory of the S/D/H/* layers; each convolution path
    cp      cp.py      context parallel: bytes sent by D/H layers, halo + modal state vs all-to-all
    pack    pack.py    Mbp/s of `hyena-glt pack` vs only reading the FASTA
    train   train.py   training tokens/s (real `hyena-glt train` runs), Hyena vs attention-only
    merge   merge.py   the byte-level model with vs without token merging
    generate generate.py cached decoding vs recompute; streaming vs one-pass scoring memory
    stream  stream.py  chunked (cached) vs one-pass scoring time and memory with attention; 1 Mbp streams
    plan    plan.py    `hyena-glt plan`'s predictions beside measured runs of 9 layouts
    gpu     gpu.py     the CUDA check (make gpu-check)

Each module exposes `add_arguments(parser)` and `run(args) -> int`. Results print as a
table and as JSON (`--json FILE` to keep them). Benchmarks read FASTA input only through
data_tools.fasta (the bench pack "read only" case times pyfastx itself: it is the ceiling
that `pack` is compared with).
"""

from __future__ import annotations

import importlib

BENCH_TARGETS = {
    "ops": ("launch.bench.ops", "fwd+bwd time and peak memory of S/D/H/* layers; every convolution path"),
    "pack": ("launch.bench.pack", "Mbp/s of `pack` (1 and 2 workers) vs just reading the FASTA"),
    "cp": ("launch.bench.cp", "context parallel: bytes sent and step time of D/H layers, halo + state vs all-to-all"),
    "train": ("launch.bench.train", "training tokens/s: tiny/small, 1 vs 2 processes (DP, TP), Hyena vs attention-only"),
    "merge": ("launch.bench.merge", "byte-level model with vs without token merging; position-system cost"),
    "generate": ("launch.bench.generate", "cached decoding vs recompute tokens/s; streaming vs one-pass scoring memory"),
    "stream": ("launch.bench.stream", "chunked vs one-pass scoring time and memory (tiny attention model), "
               "1 Mbp streams of both tiny models"),
    "plan": ("launch.bench.plan", "the planner's memory, CP bytes and step time beside measured training runs "
             "(1, 2, 4 ranks)"),
    "gpu": ("launch.bench.gpu", "the CUDA check (make gpu-check): CUDA vs CPU forward, 1B bf16 tokens/s, MFU, memory"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (ops, pack, ...) and print a table + JSON")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    for name, (module_name, help_text) in BENCH_TARGETS.items():
        tp = targets.add_parser(name, help=help_text, description=help_text)
        tp.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
        tp.set_defaults(func=_runner(module_name), _bench_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(tp)
        except ModuleNotFoundError as e:
            if not (e.name and module_name.startswith(e.name)):
                raise
            tp.set_defaults(func=_missing(module_name))


def _runner(module_name):
    def run(args):
        return importlib.import_module(module_name).run(args)

    return run


def _missing(module_name):
    def run(args):
        raise ValueError(f"benchmark module {module_name} is not available in this checkout")

    return run
