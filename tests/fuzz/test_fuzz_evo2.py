"""Fuzzing `hyena-glt import-evo2` (launch/interop/evo2.py): the
published Evo 2 / Vortex YAML (`config_from_evo2`) and the release checkpoint (`read_release`,
`evo2_to_ours`).

Inputs: a tiny Evo 2 release written by our own `export-vortex` (its .pt and .yml), the
YAML damaged as a tree (values of another type, out of range, NaN/inf, keys deleted or unknown)
or byte by byte, the checkpoint damaged byte by byte or as a state dict (keys dropped or added,
tensors of another shape or dtype, values that are not tensors). Properties: the import works,
or exits 2 with one line naming the config or the checkpoint, and leaves no output directory.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from fuzzlib import (
    assert_one_line_error,
    budget,
    damaged,
    damaged_tree,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    from support.evo2_oracle import tiny_config

    from hyena_glt import HyenaGLTForCausalLM
    from launch.interop.evo2 import config_from_evo2

    root = tmp_path_factory.mktemp("fuzz_evo2")
    cfg = config_from_evo2(tiny_config("evo2-7b-8k", hidden=32, layers=4, head_dim=16))
    HyenaGLTForCausalLM(cfg).save_pretrained(root / "model")
    rc, _, err = run_cli("export-vortex", root / "model", root / "m.pt")
    assert rc == 0, err
    return root / "m.pt", root / "m.yml"


def _import(ckpt: Path, yml: Path, out: Path):
    return run_cli("import-evo2", ckpt, "--config", yml, out)


def _check(rc, err, out: Path, *names) -> None:
    if rc != 0:
        assert_one_line_error(rc, err, "import-evo2", *names)
        assert not out.exists(), "a failed import left its output directory"


@budget(30)
@given(data=st.data())
def test_import_with_a_damaged_yaml_works_or_exits_2_with_one_line(release, data):
    ckpt, yml = release
    raw = yml.read_bytes()
    if data.draw(st.booleans()):
        text = data.draw(damaged(st.just(raw)))
    else:
        text = yaml.safe_dump(data.draw(damaged_tree(yaml.safe_load(raw))), sort_keys=False).encode()
    with scratch() as d:
        (d / "c.yml").write_bytes(text)
        out = d / "out"
        real = data.draw(st.booleans())
        rc, _, err = _import(ckpt if real else d / "absent.pt", d / "c.yml", out)
        _check(rc, err, out, d / "c.yml", ckpt if real else d / "absent.pt")


OPS = st.sampled_from(["drop", "add", "shape", "int", "nan", "value", "half", "keytype"])
VALUES = st.sampled_from([1, "x", None, [1.0], {"a": 0}])


def _damage_state(state: dict, ops: list[tuple[int, str, object]]) -> dict:
    """`state` with each (key index, operation, value) applied. The test draws the operations,
    not tensors: hypothesis prints what it drew, and the repr of a damaged tensor can fail."""
    state = dict(state)
    keys = sorted(k for k in state if isinstance(k, str) and torch.is_tensor(state[k]))
    for i, op, value in ops:
        key = keys[i % len(keys)]
        t = state.get(key)
        if op == "drop":
            state.pop(key, None)
        elif op == "add":
            state[key + "_x"] = torch.zeros(2)
        elif op == "shape" and torch.is_tensor(t):
            state[key] = torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else torch.zeros(2)
        elif op == "int" and torch.is_tensor(t) and t.is_floating_point():
            state[key] = torch.nan_to_num(t).to(torch.int64)
        elif op == "nan" and torch.is_tensor(t) and t.is_floating_point():
            state[key] = torch.full_like(t, float("nan"))
        elif op == "value":
            state[key] = value
        elif op == "half" and torch.is_tensor(t):
            state[key] = t.half()
        elif op == "keytype":
            state[7] = torch.zeros(1)
    return state


def _load_state(ckpt: Path) -> dict:
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(ckpt, map_location="cpu", weights_only=True)


@budget(25)
@given(data=st.data())
def test_import_of_a_damaged_checkpoint_works_or_exits_2_with_one_line(release, data):
    ckpt, yml = release
    with scratch() as d:
        bad = d / "m.pt"
        if data.draw(st.booleans()):
            bad.write_bytes(data.draw(damaged(st.just(ckpt.read_bytes()), max_steps=2)))
        else:
            ops = data.draw(st.lists(st.tuples(st.integers(0, 999), OPS, VALUES), min_size=1, max_size=3))
            buf = io.BytesIO()
            torch.save(_damage_state(_load_state(ckpt), ops), buf)
            bad.write_bytes(buf.getvalue())
        out = d / "out"
        rc, _, err = _import(bad, yml, out)
        _check(rc, err, out, bad)


# ---------------------------------------------------------------------------- found by fuzzing


def test_evo2_yaml_fields_of_the_wrong_type_are_one_line(release, tmp_path):
    """num_layers: [1] or hidden_size: {a: 1} (TypeError from int()), hcs_layer_idxs: 5 (TypeError:
    not iterable), a key that is not a string (`0: model`: TypeError from sorted() of the unknown
    fields), num_filters: 0 (ZeroDivisionError), eps: [1] gave tracebacks; num_layers: 10**9 made
    config_from_evo2 loop over range(num_layers) (a hang). Each field is now converted through a
    checked helper (`_whole`, `_real`: a bounded whole number / a finite number, ValueError naming
    the field), the *_layer_idxs fields must be lists and the keys strings: one line naming the config."""
    ckpt, yml = release
    for change in ({"num_layers": [1]}, {"hcs_layer_idxs": 5}, {"hidden_size": {"a": 1}}, {0: "model"},
                   {"num_filters": 0}, {"eps": [1]}, {"eps": ".nan"}, {"num_layers": 10**9}, {"num_layers": True},
                   {"hidden_size": 10**400}, {"inner_mlp_size": 2.5}, {"max_seqlen": 2**40}):
        cfg = yaml.safe_load(yml.read_text())
        cfg.update(change)
        (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
        for ckpt_path in (tmp_path / "absent.pt", ckpt):
            rc, _, err = _import(ckpt_path, tmp_path / "c.yml", tmp_path / "out")
            _check(rc, err, tmp_path / "out", tmp_path / "c.yml")
            assert rc == 2


def test_evo2_yaml_round_trips_through_json():  # the fixture's YAML is plain data: the damage helpers apply
    from support.evo2_oracle import tiny_config

    cfg = tiny_config("evo2-7b-8k", hidden=32, layers=4, head_dim=16)
    assert json.loads(json.dumps(cfg)) == cfg
