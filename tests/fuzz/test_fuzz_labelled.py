"""Fuzzing the labelled-sequence reader of `finetune`, `predict` and co-training
(data_tools/labelled.py `read_labelled`) and the labels' meaning per task kind
(launch/finetune/data.py `prepare_task`: class names, per-base labels, regression numbers).

Inputs: CSV, TSV and FASTA files generated from records (headers or none, id columns, quoted
fields, `label=X` / `|X` / ` X` FASTA headers, labels for each task kind), damaged byte by byte,
a quarter gzipped. Properties: an undamaged file reads back exactly; a damaged one reads or is
refused in one line naming the file, for every task kind; `finetune` exits 2 with that line.
"""

from __future__ import annotations

import csv
import io

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

from data_tools.labelled import read_labelled
from hyena_glt.heads import TASK_KINDS
from launch.finetune.data import prepare_task

SEQ = st.text("ACGTNacgtn", min_size=1, max_size=30)
SUFFIX = {"csv": ".csv", "tsv": ".tsv", "fasta": ".fa", "sniffed": ".dat"}

# A warning the reader lets through is printed by the command: a failure here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")


@st.composite
def labelled_file(draw) -> tuple[str, bytes, list[tuple[str | None, str, str]]]:
    """(format, the file's bytes, (id or None, sequence, label) of each record)."""
    fmt = draw(st.sampled_from(["csv", "tsv", "fasta", "sniffed"]))
    kind = draw(st.sampled_from(["class", "tokens", "number"]))
    records = []
    for i in range(draw(st.integers(1, 6))):
        seq = draw(SEQ)
        if kind == "class":
            label = draw(st.sampled_from(["pos", "neg", "0", "1", "class_a"]))
        elif kind == "tokens":
            label = "".join(draw(st.sampled_from("01")) for _ in seq)
        else:
            label = draw(st.sampled_from(["1.5", "-2", "3e2", "0", "7"]))
        records.append((f"r{i}", seq, label))
    if fmt == "fasta":
        style = draw(st.sampled_from(["label=", "|", " "]))
        text = "".join(f">{rid}{' label=' if style == 'label=' else style}{label}\n{seq}\n" for rid, seq, label in records)
        return fmt, text.encode(), records
    delim = "\t" if fmt == "tsv" else ","
    header = draw(st.sampled_from([None, ["sequence", "label"], ["id", "seq", "target"], ["name", "sequence", "y"]]))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    if header:
        w.writerow(header)
    for rid, seq, label in records:
        w.writerow([rid, seq, label] if header and len(header) == 3 else [seq, label])
    with_ids = bool(header and len(header) == 3)
    return fmt, buf.getvalue().encode(), [(rid if with_ids else None, seq, label) for rid, seq, label in records]


@budget(30)
@given(labelled_file())
def test_undamaged_labelled_file_reads_back_exactly(case):
    fmt, raw, records = case
    with scratch() as d:
        path = d / f"in{SUFFIX[fmt]}"
        path.write_bytes(raw)
        got = read_labelled(path)
        assert [(r.sequence, r.label) for r in got] == [(s, lab) for _, s, lab in records]
        assert [r.id for r in got if records[0][0] is not None] == [rid for rid, _, _ in records if rid is not None]


@budget(60)
@given(maybe_gzipped(damaged(labelled_file().map(lambda c: c[1]))), st.sampled_from(sorted(SUFFIX.values())),
       st.sampled_from(list(TASK_KINDS)))
def test_damaged_labelled_file_reads_or_is_refused_in_one_line(case, suffix, kind):
    raw, gz = case
    with scratch() as d:
        path = d / f"in{suffix}{'.gz' if gz else ''}"
        path.write_bytes(raw)
        try:
            records = read_labelled(path, require_labels=False)
        except ValueError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
            mapped_error(e, path, input=str(path))
            return
        assert records and all(r.sequence for r in records)
        try:
            prepare_task(kind, str(path), None, 64)
        except ValueError as e:
            mapped_error(e, path, train=str(path))


@budget(25)
@given(maybe_gzipped(damaged(labelled_file().map(lambda c: c[1]))), st.sampled_from(list(TASK_KINDS)))
def test_finetune_refuses_a_bad_labelled_file_in_one_line(case, kind):
    raw, gz = case
    with scratch() as d:
        path = d / f"train.csv{'.gz' if gz else ''}"
        path.write_bytes(raw)
        try:
            prepare_task(kind, str(path), None, 64)
            return  # readable: finetune would go on to the model
        except ValueError:
            pass
        (d / "model").mkdir()
        (d / "model" / "config.json").write_text("{}")
        rc, _, err = run_cli("finetune", "--model", d / "model", "--task", kind, "--train", path, "--out", d / "out")
        assert_one_line_error(rc, err, "finetune", path)


# ---------------------------------------------------------------------------- found while fuzzing


@pytest.mark.parametrize("name, text", [("long.csv", "sequence,label\n{seq},1\n"), ("long.tsv", "{seq}\t1\n"),
                                        ("long.fa", ">x label=1\n{seq}\n")])
def test_sequences_longer_than_csv_field_limit_are_read(tmp_path, name, text):
    import csv

    seq = "ACGT" * 50_000  # 200 kb: over csv's default field limit (128 KiB), which refused it
    path = tmp_path / name
    path.write_text(text.format(seq=seq))
    limit = csv.field_size_limit()
    assert [(r.sequence, r.label) for r in read_labelled(path)] == [(seq, "1")]
    assert csv.field_size_limit() == limit  # the process-wide limit is put back
