"""`hyena-glt COMMAND --help` shows every option's default.

The formatter is set once, where launch/cli.py makes the subparsers (DefaultsHelpFormatter,
combined with a command's own formatter_class), so every command and nested command (`data
stats`, each `bench TARGET`) gets it, including options without help text. Switches
(store_true: off unless given), None defaults (nothing) and empty lists show none.
"""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from launch import cli_docs
from launch.cli import DefaultsHelpFormatter, build_parser, main, shows_default


def _has_default(action: argparse.Action) -> bool:
    d = action.default
    return (d is not None and d is not argparse.SUPPRESS and action.nargs != 0 and action.help is not argparse.SUPPRESS
            and not (isinstance(d, (list, tuple)) and not d) and (bool(action.option_strings) or action.nargs in ("?", "*")))


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The --help lines of one option, as one line."""
    return " ".join(parser._get_formatter()._format_action(action).split())


def _subcommands():
    return [(" ".join(path), parser) for path, _, parser in cli_docs._commands(build_parser())]


def test_every_option_with_a_default_shows_it_in_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    missing, checked = [], 0
    for name, parser in _subcommands():
        assert issubclass(parser.formatter_class, DefaultsHelpFormatter), name
        for action in parser._actions:
            if not _has_default(action):
                continue
            checked += 1
            text = _help_of(parser, action)
            if str(action.default) not in text:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: {text}")
    assert checked > 80  # every command's options, not an empty walk
    assert not missing, "options whose --help does not show their default:\n  " + "\n  ".join(missing)


def test_no_meaningless_defaults_in_help(monkeypatch):
    """Switches, None and [] defaults add nothing: no `(default: False)` / `(default: None)`."""
    monkeypatch.setenv("COLUMNS", "200")
    for name, parser in _subcommands():
        text = parser.format_help()
        for bad in ("(default: None)", "(default: False)", "(default: True)", "(default: [])"):
            assert bad not in text, f"{name} --help: {bad}"


def test_help_output_of_a_command(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["predict", "--help"])
    lines = [" ".join(x.split()) for x in out.getvalue().splitlines()]
    assert "--batch-size BATCH_SIZE" in lines and "(default: 32)" in lines  # an option without help text
    assert "--max-len MAX_LEN longer sequences are truncated to this many bases (default: 1024)" in lines
    assert "--sequence SEQUENCE a sequence to predict (repeatable)" in lines  # [] default: none shown


def test_a_commands_own_formatter_is_kept():
    """pack names RawDescriptionHelpFormatter: its description keeps its line breaks, and its
    options still show their defaults."""
    parser = dict(_subcommands())["pack"]
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    text = parser.format_help()
    assert "Exit codes: 0 all done; 1 done but some inputs were skipped (--skip-bad-files);\n" in text
    assert "(default: 8192)" in text


def test_shows_default_rules():
    p = argparse.ArgumentParser()
    actions = {
        "switch": p.add_argument("--switch", action="store_true"),
        "none": p.add_argument("--none"),
        "empty": p.add_argument("--empty", action="append", default=[]),
        "given": p.add_argument("--given", type=int, default=3),
        "zero": p.add_argument("--zero", type=int, default=0),
        "spelled": p.add_argument("--spelled", default="a", help="default %(default)s"),
        "positional": p.add_argument("pos", nargs="?", default="x"),
    }
    assert {k for k, a in actions.items() if shows_default(a)} == {"given", "zero", "positional"}
