"""What the fuzz tests share (no tests here): the hypothesis profiles, the strategies that damage
real inputs, and the checks of "loads, or one line naming the file".

Profiles (HYPOTHESIS_PROFILE selects one; `make test` runs `ci`, `make fuzz` runs `fuzz`):

  ci    the default: a few dozen examples per test (`budget(n)`: n), derandomized so that every
        run tries the same inputs (a CI failure reproduces), no deadline (the machine is shared).
  fuzz  FUZZ_EXAMPLES (default 2000) examples per test, random seeds; a failure prints the
        `@reproduce_failure` blob to replay it.

Every parser is checked the same way: an input either loads (and what loads is what the file
says: compared with an independent reading where there is one), or the parser raises an error
that `hyena-glt`'s error mapping (launch/cli.py `user_error`) turns into ONE line naming the
file, and the command that reads it (run in this process) exits 2 with that one line on stderr
and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_CHECKS, print_blob=True)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False, database=None,
                          suppress_health_check=_CHECKS, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def budget(n: int) -> settings:
    """`@budget(n)`: n examples under the ci profile (what `make test` runs), FUZZ_EXAMPLES
    under the fuzz profile."""
    return settings(max_examples=n if PROFILE == "ci" else FUZZ_EXAMPLES)


# ---------------------------------------------------------------------------- running commands


def run_cli(*args, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`hyena-glt ARGS` in this process: (exit status, stdout, stderr), as tests/conftest.py's
    run_cli, with `env` set for the call. A traceback (an exception the CLI does not map to a
    one-line error) propagates: the test fails with it."""
    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as shown:
            # What a fresh `hyena-glt` process shows: every warning but the deprecation kinds
            # (Python's default filters), less what the CLI silences itself.
            warnings.simplefilter("always")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code
        for w in shown:  # printed on stderr by a real process
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, ""))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The lines a terminal keeps of stderr (a progress bar redraws itself with '\\r')."""
    return [seg.rsplit("\r", 1)[-1] for seg in err.split("\n") if seg.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(rc: int, err: str, command: str, *names) -> str:
    """Exit status 2 and exactly one stderr line `hyena-glt COMMAND: error: ...` that names one
    of `names` (paths: the full path or the file name). Returns the message."""
    lines = error_lines(err)
    assert rc == 2, f"exit status {rc}, expected 2; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    prefix = f"hyena-glt {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert names_one_of(lines[0], names), f"the error names none of {[str(n) for n in names]}: {lines[0]}"
    return lines[0][len(prefix):]


def names_one_of(message: str, names) -> bool:
    for n in names:
        n = str(n)
        if n and (n in message or repr(n)[1:-1] in message or (Path(n).name and Path(n).name in message)):
            return True
    return False


def mapped_error(exc: BaseException, *names, **args) -> str:
    """What the CLI prints for `exc` raised by a command whose arguments are `args`: must be one
    line naming one of `names` (else this raises AssertionError with the exception)."""
    from launch.cli import user_error

    msg = user_error(exc, argparse.Namespace(**args))
    assert msg is not None, f"not mapped to a one-line error (the CLI would print a traceback): {exc!r}"
    assert "\n" not in msg
    assert names_one_of(msg, names), f"the error names none of {[str(n) for n in names]}: {msg}"
    return msg


@contextlib.contextmanager
def scratch():
    """A fresh directory per example (hypothesis runs many examples in one test call)."""
    d = tempfile.mkdtemp(prefix="fuzz-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- damaging bytes

# Tokens that parsers get wrong: numbers out of range or not numbers, separators, bytes that
# are not UTF-8 or are unusual Unicode (int() accepts fullwidth digits and '1_000').
TOKENS = [b"", b"0", b"-0", b"-1", b"1.5", b"+5", b" 7", b"1_000", b"0x10", b"1e3", b"nan", b"NaN", b"-nan", b"inf",
          b"-inf", b"Infinity", b"1e999", b"-1e999", b"99999999999999999999999", b"9223372036854775808",
          b"65505", b"\x00", b"\xff", b"\xff\xfe", b"\xc3", "\u00e9".encode(), "\uff11".encode(),
          "\u2028".encode(), "\U0001f600".encode(), b"\xef\xbb\xbf", b"\t", b"\n", b"\r\n", b"\r", b" ", b"\x0b",
          b"\x0c", b">", b"#", b"@", b",", b";", b"|", b"=", b"*", b"&a", b"!!python/tuple", b"{", b"[", b"]",
          b'"', b"'", b"null", b"true", b"~", b".", b"..", b"-", b"N", b"n"]

_SEPARATORS = b"\t\n ,:=|;"


@st.composite
def damaged(draw, valid: st.SearchStrategy[bytes], max_steps: int = 4) -> bytes:
    """A valid input with 0..max_steps damages: bit flips, bytes set, ranges deleted, inserted
    or duplicated, truncation, a field replaced by an odd token, lines swapped."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, max_steps))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "token", "truncate", "dup", "field", "swap"]))
        n = len(data)
        pos = draw(st.integers(0, n))
        if op == "flip" and n:
            data[min(pos, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[min(pos, n - 1)] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and n:
            a = draw(st.integers(0, n - 1))
            data[pos:pos] = data[a : a + draw(st.integers(1, 64))]
        elif op == "field":
            fields = _fields(bytes(data))
            if fields:
                a, b = draw(st.sampled_from(fields))
                data[a:b] = draw(st.sampled_from(TOKENS))
        elif op == "swap":
            lines = bytes(data).split(b"\n")
            if len(lines) > 1:
                i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
                data = bytearray(b"\n".join(lines))
    return bytes(data)


def _fields(data: bytes) -> list[tuple[int, int]]:
    """(start, stop) of each run of bytes between separators."""
    out, start = [], 0
    for i, b in enumerate(data[:4096]):
        if b in _SEPARATORS:
            if i > start:
                out.append((start, i))
            start = i + 1
    return out


@st.composite
def maybe_gzipped(draw, data: st.SearchStrategy[bytes]) -> tuple[bytes, bool]:
    """(bytes, gzipped): a quarter of the inputs gzip-compressed, some of those cut short or
    with a byte changed."""
    raw = draw(data)
    if not draw(st.integers(0, 3)) == 0:
        return raw, False
    z = bytearray(gzip.compress(raw, mtime=0))
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "append"]))
    if damage == "truncate":
        del z[draw(st.integers(2, max(2, len(z) - 1))):]
    elif damage == "flip":
        i = draw(st.integers(10, max(10, len(z) - 1)))
        if i < len(z):
            z[i] ^= 0xFF
    elif damage == "append":
        z += draw(st.binary(min_size=1, max_size=8))
    return bytes(z), True


# ---------------------------------------------------------------------------- damaging JSON / YAML trees

WEIRD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=12), st.sampled_from(["", "nan", "inf", "-1", "1e999", "x", "\u00e9", "\x00"]),
    st.lists(st.integers(-5, 5), max_size=3), st.just({}), st.just([]), st.dictionaries(st.text(max_size=4),
                                                                                        st.integers(), max_size=2),
)


def _weird(draw):
    """A WEIRD_VALUES value of its own: st.just({}) and st.just([]) give one shared object, which
    a later damage ('add') would change for every example after (until it contains itself)."""
    return copy.deepcopy(draw(WEIRD_VALUES))


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def damaged_tree(draw, obj, max_steps: int = 3):
    """A deep copy of a JSON/YAML tree with 1..max_steps damages: a value replaced by one of
    another type or out of range, a key deleted, an unknown key added, a list emptied."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, max_steps))):
        path = draw(st.sampled_from(_paths(obj)))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "wrap"]))
        if not path:
            if op == "replace" and draw(st.integers(0, 4)) == 0:
                obj = _weird(draw)
            elif op == "add" and isinstance(obj, dict):
                obj[draw(st.text(min_size=1, max_size=8))] = _weird(draw)
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "replace":
            parent[key] = _weird(draw)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.text(min_size=1, max_size=8))] = _weird(draw)
        elif op == "wrap":
            parent[key] = [parent[key]]
    return obj


def json_bytes(obj) -> bytes:
    """JSON as Python writes it, NaN and Infinity included (json.loads reads them back)."""
    return json.dumps(obj, allow_nan=True).encode()
