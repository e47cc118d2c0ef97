"""`hyena-glt`: the one command-line entry point.

Each capability registers its own subcommands (a `register(subparsers)` function in its
package), so this file stays a table of contents. Handlers import heavy libraries
(megatron-core, deepspeed, webdataset) lazily, so `hyena-glt --help` is instant.
"""

from __future__ import annotations

import argparse
import copy
import errno
import functools
import importlib
import json
import os
import sys
import warnings
import zlib
from pathlib import Path

# Modules that add subcommands, in the order they appear in --help, with the subcommands
# each adds. Running a command imports only its own module: some import torch at the top,
# which `hyena-glt pack` (and a pack worker forked from it) must not pay for.
COMMAND_MODULES = {
    "launch.training.commands": ("demo", "train"),
    "launch.inference.commands": ("generate", "info"),
    "launch.checkpoint.convert": ("convert", "reshard"),
    "launch.interop.evo2": ("import-evo2", "export-vortex"),
    "launch.inference.evaluate": ("eval", "score", "embed"),
    "launch.inference.variants": ("score-variants",),
    "launch.data.commands": ("pack", "data"),
    "launch.finetune.commands": ("finetune", "predict"),  # task heads
    "launch.plan.commands": ("plan", "calibrate"),  # layouts ranked by a cost model
    "launch.bench": ("bench",),
}


class CLIError(Exception):
    """An error to report to the user as one line (no traceback)."""


# ---------------------------------------------------------------------------- --help

def shows_default(action: argparse.Action) -> bool:
    """Whether `--help` adds `(default: X)` to an option: it has a value when not given. Not for
    switches (store_true & co: off unless given), None (nothing) or an empty list, nor when the
    help already says `%(default)s`."""
    d = action.default
    return (d is not None and d is not argparse.SUPPRESS and action.nargs != 0
            and not (isinstance(d, (list, tuple)) and not d)
            and (bool(action.option_strings) or action.nargs in ("?", "*"))
            and "%(default)" not in (action.help or ""))


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds `(default: X)` to the help of every option that has a default (`shows_default`),
    also to options without help text. Combined with a subcommand's own formatter_class."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = super()._get_help_string(action) or ""
        if not shows_default(action):
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text.strip() else "(default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and action.help is not argparse.SUPPRESS and shows_default(action):
            action = copy.copy(action)  # argparse prints no help line for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _SubcommandParser(argparse.ArgumentParser):
    """The parser of every subcommand (and, through add_subparsers, of nested ones): --help shows
    each option's default (DefaultsHelpFormatter), whatever formatter_class the command names."""

    def __init__(self, *args, formatter_class=argparse.HelpFormatter, **kwargs):
        if not issubclass(formatter_class, DefaultsHelpFormatter):
            formatter_class = _with_defaults(formatter_class)
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


@functools.cache
def _with_defaults(formatter_class: type) -> type:
    if formatter_class is argparse.HelpFormatter:
        return DefaultsHelpFormatter
    return type(f"Defaults{formatter_class.__name__}", (DefaultsHelpFormatter, formatter_class), {})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or only of `command`'s module when one adds it."""
    parser = argparse.ArgumentParser(
        prog="hyena-glt",
        description="Hyena-GLT: byte-level striped-Hyena genomic language models: pack data, train (single "
        "process or torchrun/deepspeed), convert, evaluate, benchmark.",
    )
    # Every subcommand's --help shows its defaults: set here, once, for all of them.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
    owners = [name for name, commands in COMMAND_MODULES.items() if command in commands]
    for name in owners or COMMAND_MODULES:
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


def _quiet_third_party_warnings() -> None:
    """Silence what libraries warn about at import (megatron-core without Transformer Engine
    or Apex on a CPU machine, ...): nothing the user can act on, and printed before a one-line
    error it would hide that line among others."""
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "absl.logging is not installed"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_warnings()
    argv = _take_local_rank(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)  # the top-level parser has no option but -h
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = " ".join(x for x in (args.command, getattr(args, "data_command", None)) if x)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit ("Exception ignored ... BrokenPipeError")
    except BrokenPipeError as e:
        if _stdout_closed():  # `hyena-glt data stats PACK | head -1`: the reader has what it wanted
            return 141  # as a process killed by SIGPIPE (128 + 13), quietly
        msg = None if os.environ.get("HYENA_GLT_DEBUG") else user_error(e, args)
        if msg is None:
            raise
        print(f"hyena-glt {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyena-glt {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        msg = None if os.environ.get("HYENA_GLT_DEBUG") else user_error(e, args)
        if msg is None:
            raise
        print(f"hyena-glt {name}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (a BrokenPipeError from writing to another
    pipe is an error like any other). If so, stdout is pointed at /dev/null, so that Python's
    flush at exit does not report it again (the standard recipe, Python docs: signal, "Note on
    SIGPIPE")."""
    closed = False
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        closed = True
    except (OSError, ValueError):
        return False
    try:
        fd = sys.stdout.fileno()
        if not closed:
            import select

            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            closed = any(ev & select.POLLERR for _, ev in poll.poll(0))  # a pipe without readers
        if closed:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests' StringIO), or no poll()
        pass
    return closed


# ---------------------------------------------------------------------------- user errors
#
# Failures caused by what the user gave (a damaged file, a full disk, a bad value) become one
# line naming the file or option; anything else keeps its traceback. Libraries often raise
# without naming the file (json.loads of a string, safetensors, a write to a full disk): the
# file is then found among the paths the command was given (files, and the files in the
# directories given), by its content.

_OUTPUT_OPTIONS = ("out", "output", "per_base")  # argparse dests that name what a command writes
_MAX_SCAN = 64 << 20  # files larger than this are not read to find where an error came from
_BINARY = (".safetensors", ".tar", ".idx", ".npy", ".pt", ".bin", ".bgz", ".bz2", ".xz", ".zst")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def user_error(e: BaseException, args) -> str | None:
    """One line describing a user-caused failure, or None for anything else (a bug: keep its
    traceback)."""
    if isinstance(e, json.JSONDecodeError):
        return _json_error(e, args)
    if isinstance(e, UnicodeDecodeError):
        return _unicode_error(e, args)
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(e, yaml.YAMLError):
        return _yaml_error(e, args, yaml)
    if type(e).__name__ == "SafetensorError":
        return _safetensors_error(e, args)
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        return _os_error(e, args)
    if isinstance(e, KeyError):
        where = ", ".join(str(p) for p in _given_paths(args)) or "the command's input"
        key = e.args[0] if e.args else "?"
        return (f"missing key {key!r} in a file read from {where}: the file is damaged or incomplete, "
                "or was written by another version")
    if isinstance(e, (CLIError, ValueError, OSError)):
        return " ".join(m.strip() for m in str(e).strip().splitlines()) or type(e).__name__
    return None


def _given_paths(args) -> list[Path]:
    """Existing files and directories named by the command's arguments (also `key=value` values)."""
    out: list[Path] = []
    for key, value in vars(args).items():
        if key in ("func", "command"):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, str) or not v:
                continue
            for text in (v, v.split("=", 1)[1]) if "=" in v else (v,):
                p = Path(text)
                try:
                    if p.exists() and p not in out:
                        out.append(p)
                except OSError:
                    pass
    return out


def _candidate_files(args, suffixes: tuple[str, ...] | None = None, limit: int = 500) -> list[Path]:
    """The files given, and the files in the directories given (two levels down)."""
    files: list[Path] = []
    for p in _given_paths(args):
        if p.is_file():
            found = [p]
        else:
            try:
                found = sorted(q for pattern in ("*", "*/*") for q in p.glob(pattern) if q.is_file())
            except OSError:
                found = []
        files += [q for q in found if q not in files and (suffixes is None or q.suffix.lower() in suffixes)]
        if len(files) >= limit:
            break
    return files[:limit]


def _read(path: Path) -> bytes | None:
    """A text file's bytes (gunzipped), or None for a large or binary file."""
    try:
        if path.suffix.lower() in _BINARY or path.stat().st_size > _MAX_SCAN:
            return None
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip: errors are about the text inside
            import gzip

            data = gzip.decompress(data)
        return data
    except (OSError, EOFError, ValueError, zlib.error):  # a damaged .gz: zlib.error (not an OSError)
        return None


def _text(path: Path) -> str | None:
    data = _read(path)
    return None if data is None else data.decode("utf-8", "replace")


def _json_error(e: json.JSONDecodeError, args) -> str:
    what = f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is damaged or truncated"
    for f in dict.fromkeys(_candidate_files(args, (".json",)) + _candidate_files(args)):
        if _text(f) == e.doc:
            return f"{f}: {what}"
    return f"{what} (a JSON file read from {', '.join(map(str, _given_paths(args))) or 'the input'})"


def utf8_error_line(data: bytes) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte of `data` that is not UTF-8, or None."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        return data.count(b"\n", 0, err.start) + 1, err.start - start + 1, data[err.start]


def _unicode_error(e: UnicodeDecodeError, args) -> str:
    obj = bytes(e.object)
    bad = obj[e.start] if e.start < len(obj) else 0
    for f in _candidate_files(args):
        data = _read(f)
        if not data:
            continue
        off = data.find(obj) if obj else -1
        if off >= 0:
            line = data.count(b"\n", 0, off + e.start) + 1
            return f"{f} line {line}: not UTF-8 text (byte 0x{bad:02x}); save the file as UTF-8"
    return f"an input file is not UTF-8 text (byte 0x{bad:02x}: {e.reason}); save it as UTF-8"


def _yaml_error(e, args, yaml) -> str:
    if isinstance(e, yaml.reader.ReaderError):  # bytes that are not UTF-8
        f = Path(e.name) if e.name and Path(e.name).is_file() else None
        if f is not None and (data := _read(f)) is not None and (loc := utf8_error_line(data)):
            return f"{f} line {loc[0]}: not UTF-8 text (byte 0x{loc[2]:02x}); save the file as UTF-8"
        return f"{f or 'a YAML file'}: not UTF-8 text ({e.reason})"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = f"not valid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return what
    f: Path | str | None = Path(mark.name) if mark.name and Path(mark.name).is_file() else None
    if f is None and mark.buffer is not None:
        text = mark.buffer.rstrip("\0")
        first = _candidate_files(args, (".yaml", ".yml"))
        f = next((c for c in dict.fromkeys(first + _candidate_files(args)) if _text(c) == text), None)
    return f"{f or 'a YAML file'} line {mark.line + 1}, column {mark.column + 1}: {what}"


def _safetensors_error(e: Exception, args) -> str:
    what = f"not a readable safetensors file ({e}): the file is damaged or truncated"
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover
        safe_open = None
    for f in _candidate_files(args, (".safetensors",)):
        try:
            if safe_open is not None:
                with safe_open(str(f), "np") as h:
                    h.keys()
        except Exception:
            return f"{f}: {what}"
    return f"{what} (read from {', '.join(map(str, _given_paths(args))) or 'the input'})"


def _os_error(e: OSError, args) -> str:
    text = f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
    if e.filename is not None:
        return f"{e.filename}: {text}" + (f" (-> {e.filename2})" if e.filename2 is not None else "")
    outputs = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in _OUTPUT_OPTIONS if getattr(args, k, None)]
    if e.errno in _WRITE_ERRNOS and outputs:
        return f"{text} while writing {', '.join(outputs)}"
    given = ", ".join(map(str, _given_paths(args)))
    return text + (f" (files of this command: {given})" if given else "")


if __name__ == "__main__":
    sys.exit(main())
