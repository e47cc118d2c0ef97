"""`hyena-glt`: the one command-line entry point.

Each capability registers its own subcommands (a `register(subparsers)` function in its
package), so this file stays a table of contents. Handlers import heavy libraries
(megatron-core, deepspeed, webdataset) lazily, so `hyena-glt --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# Modules that add subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "launch.commands",  # demo, train, generate, info
    "launch.convert",  # convert, reshard
    "launch.evaluate",  # eval, embed
    "launch.variants",  # score-variants
    "data_tools.cli",  # pack, data
    "launch.finetune",  # finetune, predict (task heads)
    "launch.bench",  # bench
]


class CLIError(Exception):
    """An error to report to the user as one line (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyena-glt",
        description="Hyena-GLT: byte-level striped-Hyena genomic language models: pack data, train (single "
        "process or torchrun/deepspeed), convert, evaluate, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a capability not installed in this checkout
            if e.name and name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def _take_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` before the subcommand; torchrun sets
    LOCAL_RANK instead. Accept both: move the flag into the environment."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            os.environ["LOCAL_RANK"] = a.split("=", 1)[1]
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"], skip = argv[i + 1], True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = build_parser()
    args = parser.parse_args(_take_local_rank(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("HYENA_GLT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        print(f"hyena-glt {args.command}: error: {' '.join(m.strip() for m in msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyena-glt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
