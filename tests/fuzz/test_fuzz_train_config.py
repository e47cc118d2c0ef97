"""Fuzzing the training config: `TrainConfig.load` (YAML) with `key=value` overrides
(`apply_override`), as `hyena-glt train` and `train --dry-run` read them, and the model section
as `hyena-glt info CONFIG.yaml` reads it (`HyenaGLTConfig.from_yaml`).

Inputs: the shipped configs (configs/tiny.yaml, configs/tiny_cotrain.yaml) damaged as a tree
(values of another type, out of range, NaN/inf, keys deleted or unknown) or byte by byte, and
overrides of real and made-up keys with odd values. Properties: a config that loads holds only
finite numbers and every override it was given; a refusal is one line naming the file or the
override; `train --dry-run` exits 0 or 2 with one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from fuzzlib import (
    TOKENS,
    assert_one_line_error,
    budget,
    damaged,
    damaged_tree,
    mapped_error,
    names_one_of,
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

from launch.training.config import TrainConfig, apply_override

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "configs" / "tiny.yaml", REPO / "configs" / "tiny_cotrain.yaml"]
TREES = [yaml.safe_load(p.read_text()) for p in CONFIGS]
TEXTS = [p.read_bytes() for p in CONFIGS]


def _keys(tree, prefix="") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _keys(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


KEYS = sorted(set(_keys(TREES[0]) + _keys(TREES[1]))) + [
    "train.betas", "train.nonexistent", "model", "train", "", ".", "a..b", "train.steps.x", "tasks.new.kind",
    "model.pattern", "train.curriculum.start_seq_len", "data.train", "train.init_from"]
VALUES = st.one_of(st.sampled_from([t.decode("utf-8", "replace") for t in TOKENS]),
                   st.sampled_from(["[0.9, nan]", "[1, 2, 3]", "{a: 1}", "'quoted", "*alias", "&anchor x", "!!binary x",
                                    "!!python/object:os.system", ".inf", "-.inf", ".nan", "1e400", "10" * 12, "0.5",
                                    "200", "true", "bf16", "SDH*", "[[", "\t"]),
                   st.text(max_size=10))


@st.composite
def overrides(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        form = draw(st.sampled_from(["kv", "kv", "kv", "no-equals", "text"]))
        if form == "kv":
            out.append(f"{draw(st.sampled_from(KEYS))}={draw(VALUES)}")
        elif form == "no-equals":
            out.append(draw(st.sampled_from(KEYS)))
        else:
            out.append(draw(st.text(max_size=12)))
    return out


@st.composite
def config_text(draw) -> bytes:
    i = draw(st.integers(0, len(CONFIGS) - 1))
    how = draw(st.sampled_from(["as-is", "tree", "tree", "bytes"]))
    if how == "as-is":
        return TEXTS[i]
    if how == "tree":
        return yaml.safe_dump(draw(damaged_tree(TREES[i])), allow_unicode=draw(st.booleans())).encode()
    return draw(damaged(st.just(TEXTS[i])))


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v)


def _load(path: Path, items: list[str]):
    try:
        return TrainConfig.load(path, items), None
    except Exception as e:  # what the CLI maps: checked by the caller
        return None, e


@budget(50)
@given(config_text(), overrides())
def test_train_config_loads_or_is_refused_in_one_line(text, items):
    with scratch() as d:
        path = d / "config.yaml"
        path.write_bytes(text)
        tc, err = _load(path, items)
        if err is not None:
            names = [path] + [i.split("=", 1)[0] or i for i in items] + items + (["override ''"] if "" in items else [])
            mapped_error(err, *names, config=str(path), overrides=items)
            return
        bad = [v for v in _floats(tc.dump()) if not math.isfinite(v)]
        assert not bad, f"a config with non-finite numbers loaded: {bad}"
        dumped = tc.dump()
        for n, item in enumerate(items):  # what an override set is in the config
            key, raw = item.split("=", 1)
            later = [i.split("=", 1)[0].strip() for i in items[n + 1 :]]
            node = dumped
            for part in key.strip().split("."):
                node = node[part] if isinstance(node, dict) and part in node else None
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw  # apply_override takes such a value as text
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and node is not None \
                    and not isinstance(node, (dict, list)) and key.strip() != "train.init_from":
                if not any(k == key.strip() or key.strip().startswith(k + ".") for k in later):  # the last one wins
                    assert node == value or str(node) == str(value) or float(node) == float(value), (item, node)


@budget(25)
@given(config_text(), overrides())
def test_train_dry_run_exits_0_or_2_with_one_line(text, items):
    with scratch() as d:
        path = d / "config.yaml"
        path.write_bytes(text)
        rc, _, err = run_cli("train", "--config", path, "--dry-run", "--world-size", "1", *items)
        if rc != 0:
            keys = [i.split("=", 1)[0] for i in items if i.split("=", 1)[0]]
            names = [path, *keys, *items] + (["override ''"] if "" in items else [])
            assert_one_line_error(rc, err, "train", *names)


@budget(25)
@given(config_text())
def test_info_reads_the_model_section_or_exits_2_with_one_line(text):
    with scratch() as d:
        path = d / "config.yaml"
        path.write_bytes(text)
        rc, _, err = run_cli("info", path)
        if rc != 0:
            assert_one_line_error(rc, err, "info", path)


# ---------------------------------------------------------------------------- found by fuzzing


@pytest.mark.parametrize("text", [b"train: [1, 2]\n", b"train: x\n", b"train: 5\n"])
def test_config_with_a_section_of_another_type_is_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(TEXTS[0] + text)
    with pytest.raises(ValueError) as e:
        TrainConfig.load(path)
    assert str(e.value).startswith(f"{path}: train: ")


@pytest.mark.parametrize("item", ["train.steps.x=1", "=5", "model=", ".=1"])
def test_odd_overrides_are_refused_naming_the_override(tmp_path, item):
    data = yaml.safe_load(TEXTS[0])
    try:
        apply_override(data, item)
    except ValueError as e:
        assert names_one_of(str(e), [item])


def test_config_with_nonfinite_numbers_is_refused_naming_the_key():
    """`train.lr=.inf`, `train.betas=[0.9, .nan]`, `train.weight_decay=.inf`, `model.norm_eps=.inf`
    loaded (pydantic float fields allow NaN and inf; `gt=0` refuses NaN only). The ConfigDicts of
    launch/training/config.py `_Section` and hyena_glt/config.py `HyenaGLTConfig` now say
    allow_inf_nan=False: `load` names the file and the key."""
    for item in ["train.lr=.inf", "train.betas=[0.9, .nan]", "train.weight_decay=.inf", "model.norm_eps=.inf",
                 "model.entropy_threshold=.nan", "data.train={a: .inf}", "tasks.x={kind: seq-cls, train: a, weight: .nan}"]:
        with pytest.raises(ValueError) as e:
            TrainConfig.load(CONFIGS[0], [item])
        assert str(e.value).startswith(f"{CONFIGS[0]}: {item.split('=')[0].split('.')[0]}"), str(e.value)


def test_info_yaml_top_level_not_a_mapping_is_one_line(tmp_path):
    """`5`, `true` (`'model' in data`: TypeError) and `modelx` (`'model' in 'modelx'` is True, then
    `data['model']`: TypeError) gave tracebacks, `false` and `0` (`or {}`) the default config.
    hyena_glt/config.py HyenaGLTConfig.from_yaml now refuses any top level but a mapping (or an
    empty file) naming the file."""
    for text in (b"5\n", b"true\n", b"modelx\n", b"false\n", b"0\n", b"[]\n", b"''\n"):
        path = tmp_path / "c.yaml"
        path.write_bytes(text)
        rc, _, err = run_cli("info", path)
        assert_one_line_error(rc, err, "info", path)


def test_huge_model_sizes_are_one_line(tmp_path):
    """model.d_model=2**63 (TypeError 'Overflow when unpacking long long') or 2**30 (RuntimeError
    'Storage size calculation overflowed') validated, and `hyena-glt info CONFIG` and `train
    --dry-run` failed building the model on the meta device. HyenaGLTConfig now bounds the sizes
    (MAX_WIDTH, MAX_LENGTH, MAX_MLP_RATIO) and `info` maps a failed meta build to one line."""
    for key, value in (("d_model", 2**63), ("d_model", 2**30), ("vocab_size", 2**40), ("mlp_ratio", 1e300),
                       ("max_seq_len", 2**40), ("motif_kernel_sizes", [2**40])):
        data = yaml.safe_load(TEXTS[0])
        data["model"][key] = value
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        for args in (["info", path], ["train", "--config", path, "--dry-run", "--world-size", "1"]):
            rc, _, err = run_cli(*args)
            assert_one_line_error(rc, err, args[0], path)


def test_the_largest_shipped_and_evo2_shapes_still_validate():
    """The bounds leave room for every shipped config and Evo 2's 1M-token context."""
    from hyena_glt import HyenaGLTConfig

    for p in (REPO / "configs").glob("*.yaml"):
        HyenaGLTConfig.from_yaml(p)
    HyenaGLTConfig(d_model=8192, num_heads=64, num_filter_groups=512, max_seq_len=2**20, vocab_size=512,
                   mlp_hidden_size=21888)
