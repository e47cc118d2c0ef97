"""Fuzzing the FASTA readers (data_tools/fasta.py): `FastaReader` (what `pack` reads with) and
`check_file` + `read_records` (pyfastx, cross-checked: what `score`, `embed`, `generate
--prompts`, `eval` on FASTA and `score-variants --reference` read with).

Inputs: FASTA files generated from records (IUPAC DNA/RNA and protein letters, lower case,
descriptions, any line width, CRLF line ends, blank lines), damaged byte by byte (fuzzlib.damaged)
and a quarter gzipped (some of those truncated or corrupted). Properties: the three readers
agree (same records, or all refuse); an undamaged file gives exactly its records; a refusal is
one line naming the file, and `hyena-glt pack` exits 0 or 2 with that one line.
"""

from __future__ import annotations

import gzip

import pytest
from fuzzlib import (
    assert_one_line_error,
    budget,
    damaged,
    mapped_error,
    maybe_gzipped,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

from data_tools.fasta import BadInputError, FastaReader, check_file, read_records
from hyena_glt.alphabet import detect_seq_type

ID_CHARS = "ABCXYZabcxyz0123456789_.|:-/"
LETTERS = st.sampled_from(["ACGT", "ACGTN", "acgtn", "ACGU", "ACGTRYKMSWBDHVN", "ACDEFGHIKLMNPQRSTVWY*", "ACGT-.",
                           "ACGTacgtNnXx"])

# A warning the reader lets through is printed by the command: a failure here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")


@st.composite
def fasta_records(draw) -> list[tuple[str, str, bytes]]:
    """(id, description, sequence) of 1..5 records."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        rid = draw(st.text(ID_CHARS, min_size=1, max_size=12))
        desc = draw(st.sampled_from(["", " desc", " chromosome 1, complete", "\tx=1 y=2", " \u00e9t\u00e9"]))
        letters = draw(LETTERS)
        seq = draw(st.text(letters, max_size=150)).encode()
        out.append((rid, desc, seq))
    return out


@st.composite
def fasta_file(draw) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(the file's bytes, its records as (id, sequence))."""
    records = draw(fasta_records())
    width = draw(st.sampled_from([0, 1, 7, 60, 80]))
    nl = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    blank = draw(st.booleans())
    out = bytearray()
    for rid, desc, seq in records:
        out += b">" + (rid + desc).encode() + nl
        step = width or max(1, len(seq))
        for i in range(0, len(seq), step):
            out += seq[i : i + step] + nl
        if blank:
            out += nl
    if draw(st.booleans()) and out.endswith(nl):
        out = out[: -len(nl)]  # no line end at the end of the file
    return bytes(out), [(rid, seq) for rid, _, seq in records]


VALID = fasta_file().map(lambda t: t[0])


def _read_all(path):
    """(FastaReader's records or its error, check_file's FileCheck, read_records' records or error)."""
    try:
        fast = [(r.id, r.seq, r.seq_type) for r in FastaReader(path)]
    except BadInputError as e:
        fast = e
    check = check_file(path)
    try:
        slow = [(r.id, r.seq, r.seq_type) for r in read_records(path, lambda: check)]
    except BadInputError as e:
        slow = e
    return fast, check, slow


def _assert_refusal(e: BadInputError, path) -> None:
    assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
    mapped_error(e, path, inputs=[str(path)])


@budget(40)
@given(st.data())
def test_undamaged_fasta_reads_back_exactly(data):
    raw, records = data.draw(fasta_file())
    gz = data.draw(st.booleans())
    with scratch() as d:
        path = d / ("in.fa.gz" if gz else "in.fa")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        fast, check, slow = _read_all(path)
        want = [(rid, seq, detect_seq_type(bytes(set(seq)))) for rid, seq in records]
        assert fast == want
        assert slow == want
        assert check.error is None and check.records == len(records)
        assert check.bases == sum(len(s) for _, s in records)


@budget(60)
@given(maybe_gzipped(damaged(VALID)))
def test_damaged_fasta_readers_agree_or_refuse_in_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("in.fa.gz" if gz else "in.fa")
        path.write_bytes(raw)
        fast, check, slow = _read_all(path)
        if isinstance(fast, BadInputError):
            _assert_refusal(fast, path)
            assert check.error, "FastaReader refused a file that check_file accepts"
            assert isinstance(slow, BadInputError), "read_records accepted a file FastaReader refuses"
            _assert_refusal(slow, path)
        else:
            assert check.error is None, f"check_file refused ({check.error}) what FastaReader read"
            assert slow == fast, "pyfastx (read_records) and FastaReader read different records"
            assert (check.records, check.bases) == (len(fast), sum(len(s) for _, s, _ in fast))


@budget(25)
@given(maybe_gzipped(damaged(VALID)))
def test_pack_reads_fasta_or_exits_2_with_one_line(case):
    raw, gz = case
    with scratch() as d:
        path = d / ("in.fa.gz" if gz else "in.fa")
        path.write_bytes(raw)
        try:
            list(FastaReader(path))
            readable = True
        except BadInputError:
            readable = False
        rc, _, err = run_cli("pack", path, "--out", d / "out", "--seq-len", "16", "--min-len", "1", "--val-fraction",
                             "0", "--allow-empty-split", "--progress", "none")
        if readable:
            assert rc == 0, err
        else:
            assert_one_line_error(rc, err, "pack", path)


# ---------------------------------------------------------------------------- list files (`pack LIST.txt`)


@st.composite
def list_file(draw) -> bytes:
    lines = draw(st.lists(st.sampled_from(["in.fa", "sub/in2.fa", "sub", "*.fa", "sub/*.fa", "# a comment", "",
                                           "absent.fa", "~no_such_user_x/in.fa", "l.txt", "other.txt", "sub/../in.fa",
                                           "  in.fa  ", "in.fa\r"]), min_size=1, max_size=5))
    return ("\n".join(lines) + "\n").encode()


@budget(30)
@given(damaged(list_file()))
def test_input_list_files_expand_or_are_refused_in_one_line(raw):
    from data_tools.fasta import discover_inputs

    with scratch() as d:
        (d / "sub").mkdir()
        (d / "in.fa").write_bytes(b">a\nACGT\n")
        (d / "sub" / "in2.fa").write_bytes(b">b\nACGT\n")
        (d / "other.txt").write_bytes(b"l.txt\n")
        path = d / "l.txt"
        path.write_bytes(raw)
        try:
            files = discover_inputs([str(path)])
        except (FileNotFoundError, BadInputError) as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
            mapped_error(e, path, inputs=[str(path)])
            rc, _, err = run_cli("pack", path, "--out", d / "out", "--seq-len", "4", "--min-len", "1", "--progress",
                                 "none")
            assert_one_line_error(rc, err, "pack", path)
            return
        assert files and all(f.is_file() and f.is_absolute() for f in files)
        assert len({str(f.resolve()) for f in files}) == len(files)


@pytest.mark.parametrize("text, what", [("l.txt\n", "names itself"),  # was a RecursionError traceback
                                        ("other.txt\n", "names itself"),
                                        ("~no_such_user_x/in.fa\n", "cannot expand '~'"),  # was RuntimeError
                                        ("a" * 5000 + "\n", "cannot use"),  # was OSError ENAMETOOLONG, no list line
                                        ("\0ub/*.fa\n", "NUL byte")])  # was ValueError 'embedded null byte' (glob)
def test_list_files_found_by_fuzzing(tmp_path, text, what):
    from data_tools.fasta import discover_inputs

    (tmp_path / "other.txt").write_text("l.txt\n")
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises((FileNotFoundError, BadInputError), match=what):
        discover_inputs([str(tmp_path / "l.txt")])
