"""Fuzzing numeric command-line options: the argparse types of launch/args.py, and every
subcommand's numeric options (NaN, inf, huge, negative, non-numbers, Unicode digits).

A bad number is refused by argparse before anything runs (the usage line, then
`error: argument --x: ...`, exit status 2); an accepted one is finite and in its range.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math

import pytest
from fuzzlib import TOKENS, budget
from hypothesis import given
from hypothesis import strategies as st

from launch import args as A

NUMBERS = st.one_of(st.sampled_from([t.decode("utf-8", "replace") for t in TOKENS]), st.text(max_size=12),
                    st.integers(-(10**30), 10**30).map(str), st.floats().map(repr), st.just("9" * 5000))
RULES = {A.positive_int: lambda v: type(v) is int and v >= 1, A.nonnegative_int: lambda v: type(v) is int and v >= 0,
         A.positive_float: lambda v: math.isfinite(v) and v > 0, A.nonnegative_float: lambda v: math.isfinite(v) and v >= 0,
         A.fraction: lambda v: math.isfinite(v) and 0 <= v <= 1, A.probability: lambda v: math.isfinite(v) and 0 < v <= 1,
         A.layer_index: lambda v: type(v) is int}


@budget(200)
@given(st.sampled_from(list(RULES)), NUMBERS)
def test_argument_types_accept_only_finite_numbers_in_range(kind, text):
    try:
        value = kind(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
        return
    assert RULES[kind](value), (kind.__name__, text, value)


def _numeric_options():
    """(command, option string, type) of every option of every subcommand with a `type`."""
    from launch.cli import build_parser

    out = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif action.option_strings and action.type in (int, float, *RULES):
                out.append((" ".join(prefix), action.option_strings[-1], action.type))

    walk(build_parser(), [])
    return out


OPTIONS = _numeric_options()
CHECKED = [(c, o, t) for c, o, t in OPTIONS if t in RULES]
UNCHECKED = sorted((c, o) for c, o, t in OPTIONS if t not in RULES)


COMMANDS = sorted({c for c, _, _ in CHECKED})
BAD = ["nan", "inf", "-inf", "-1", "1e999", "x", ""]  # none is in the range of any checked type but layer_index
BAD_FOR = {A.layer_index: [v for v in BAD if v != "-1"]}  # -1: the last block


@pytest.mark.parametrize("command", COMMANDS)
def test_checked_numeric_options_refuse_bad_numbers_in_argparse(command):
    from launch.cli import build_parser

    words = command.split()
    parser = build_parser(words[0])
    for _, option, kind in (x for x in CHECKED if x[0] == command):
        for value in BAD_FOR.get(kind, BAD):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                    pytest.raises(SystemExit) as e:
                parser.parse_known_args([*words, f"{option}={value}"])
            assert e.value.code == 2 and f"argument {option}" in err.getvalue(), (option, value, err.getvalue())


def test_every_numeric_option_uses_a_checked_type():
    """Bare type=int/float took nan, inf or negative values: pack --val-fraction, --test-fraction,
    --max-n-fraction (launch/data/commands.py), embed --layer (launch/inference/evaluate.py), and
    bench ops/stream/generate/train --d-model, --repeats, --threads, --steps, ... (launch/bench/*.py:
    `bench ops --repeats -1` printed timings of -0.0). Every numeric option now has a type of
    launch/args.py (fraction, positive_int, nonnegative_int, layer_index, ...): a new bare
    type=int/float option fails here."""
    assert UNCHECKED == []
    assert ("embed", "--layer", A.layer_index) in CHECKED and ("pack", "--val-fraction", A.fraction) in CHECKED
