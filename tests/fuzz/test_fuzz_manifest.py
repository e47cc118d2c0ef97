"""Fuzzing pack manifests (data_tools/manifest.py `load_manifest`)
as `hyena-glt data stats DIR` and the training loaders (data_tools/dataset.py `PackedDataset`)
read them.

Inputs: the manifest.json of a real pack (train and val splits, several shards), damaged as a
tree (values of another type, out of range, NaN/inf, keys deleted or unknown) or byte by byte;
the shards are left intact. Properties: `data stats` exits 0 or 2 with one line naming the pack;
PackedDataset opens the split and reads every sample, or raises an error the CLI prints as one
line naming the pack.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fuzzlib import (
    assert_one_line_error,
    budget,
    damaged,
    damaged_tree,
    json_bytes,
    mapped_error,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

FASTA = b"".join(b">r%d\n" % i + (b"ACGTTGCAAC" * (6 + 3 * i)) + b"\n" for i in range(8))


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_pack")
    (root / "in.fa").write_bytes(FASTA)
    rc, _, err = run_cli("pack", root / "in.fa", "--out", root / "pack", "--seq-len", "16", "--min-len", "1",
                         "--val-fraction", "0.3", "--shard-size-mb", "0.0005", "--allow-empty-split", "--progress",
                         "none")
    assert rc == 0, err
    return root / "pack"


def _manifest(pack: Path, raw: bytes, d: Path) -> Path:
    out = d / "pack"
    shutil.copytree(pack, out)
    (out / "manifest.json").write_bytes(raw)
    return out


@st.composite
def damaged_manifest(draw, pack: Path, tree: bool) -> bytes:
    raw = (pack / "manifest.json").read_bytes()
    if not tree:
        return draw(damaged(st.just(raw)))
    return json_bytes(draw(damaged_tree(json.loads(raw))))


def _read_all(out: Path) -> None:
    from data_tools.dataset import PackedDataset

    for split in ("train", "val"):
        ds = PackedDataset(out, split)
        for i in range(min(len(ds), 64)):
            ds.read_sample(i)


def _stats(pack: Path, raw: bytes) -> None:
    with scratch() as d:
        out = _manifest(pack, raw, d)
        rc, _, err = run_cli("data", "stats", out)
        if rc != 0:
            assert_one_line_error(rc, err, "data stats", out)


def _load(pack: Path, raw: bytes) -> None:
    with scratch() as d:
        out = _manifest(pack, raw, d)
        try:
            _read_all(out)
        except Exception as e:  # the training loaders' errors reach the user through the CLI's mapping
            mapped_error(e, out, data=str(out))


@budget(25)
@given(data=st.data())
def test_data_stats_reads_a_byte_damaged_manifest_or_exits_2_with_one_line(pack, data):
    _stats(pack, data.draw(damaged_manifest(pack, tree=False)))


@budget(25)
@given(data=st.data())
def test_loader_reads_a_byte_damaged_manifest_or_fails_in_one_line(pack, data):
    _load(pack, data.draw(damaged_manifest(pack, tree=False)))


# ---------------------------------------------------------------------------- found by fuzzing

# data_tools/manifest.py check_manifest checked that keys were present, not their types: a manifest whose
# values had the wrong type or range ('dropped': null, totals.train.bases: null, options.seq_len: NaN
# or Infinity, which json.loads reads, shards[i].path: null, samples: "3") made `data stats`
# (data_tools/stats.py) and PackedDataset (data_tools/dataset.py) fail with TypeError, AttributeError
# or OverflowError tracebacks, or a ValueError without the file's name. check_manifest now checks the
# types and ranges, and load_manifest refuses NaN/Infinity: one line naming manifest.json and the key.


@budget(25)
@given(data=st.data())
def test_data_stats_reads_a_manifest_of_wrong_types_or_exits_2_with_one_line(pack, data):
    _stats(pack, data.draw(damaged_manifest(pack, tree=True)))


@budget(25)
@given(data=st.data())
def test_loader_reads_a_manifest_of_wrong_types_or_fails_in_one_line(pack, data):
    _load(pack, data.draw(damaged_manifest(pack, tree=True)))


def _edit(pack: Path, change) -> bytes:
    m = json.loads((pack / "manifest.json").read_bytes())
    change(m)
    return json_bytes(m)


def test_manifest_of_wrong_types_is_one_line_naming_the_key(pack):
    import math

    from data_tools.manifest import load_manifest

    cases = [(lambda m: m.update(dropped=None), "dropped"),
             (lambda m: m["totals"]["train"].update(bases=None), "totals.train.bases"),
             (lambda m: m["options"].update(seq_len=math.nan), "NaN"),
             (lambda m: m["options"].update(seq_len=math.inf), "Infinity"),
             (lambda m: m["options"].update(seq_len=2.5), "options.seq_len"),
             (lambda m: [s.update(path=None) for s in m["shards"]], "shards[0].path"),
             (lambda m: m["shards"][1].update(samples="3"), "shards[1].samples"),
             (lambda m: m["shards"][1].update(samples=2**70), "shards[1].samples"),
             (lambda m: m["options"].update(conservation=5), "options.conservation")]
    for change, key in cases:
        raw = _edit(pack, change)
        _stats(pack, raw)
        _load(pack, raw)
        with scratch() as d:
            out = _manifest(pack, raw, d)
            with pytest.raises(ValueError) as e:
                load_manifest(out)
            assert str(e.value).startswith(f"{out / 'manifest.json'}: ") and key in str(e.value), str(e.value)
