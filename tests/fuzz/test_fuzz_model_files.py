"""Fuzzing the JSON files of a saved model directory: config.json (hyena_glt/model.py
`read_config`, HyenaGLTConfig.from_json), head.json (hyena_glt/heads.py `load_head_model`,
`from_pretrained`), tasks.json (`HyenaGLTMultiTask.from_pretrained`, hyena_glt/pretrained.py
`inspect_pretrained`) and checksums.json (hyena_glt/checksums.py), as `hyena-glt info`,
`generate` and `predict` read them.

Inputs: the files of real tiny model directories (a causal LM, a regression head, a two-task
model), damaged as a tree (values of another type, out of range, NaN/inf, keys deleted or
unknown) or byte by byte. The other files are left intact; checksums are not verified
(HYENA_GLT_VERIFY_MODEL=0) except when checksums.json itself is the damaged file, so the
damage reaches the parsers. Properties: the command exits 0 or 2 with one line naming the
model directory or one of its files.

The holes found (head.json / tasks.json of the wrong shape, now read by one checked reader each
in hyena_glt/heads.py; sizes too large to build, now bounded by HyenaGLTConfig) have tests at
the end.
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
    run_cli,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st

NO_VERIFY = {"HYENA_GLT_VERIFY_MODEL": "0"}
FILES = {"lm": ["config.json", "checksums.json"], "head": ["config.json", "head.json", "checksums.json"],
         "multi": ["config.json", "tasks.json", "checksums.json"]}
SMALL = 4096  # the models are built (allocated) from config.json before the weights are checked: keep sizes sane


def tiny_config():
    from hyena_glt import HyenaGLTConfig

    return HyenaGLTConfig(pattern="S*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16,
                          modal_order=4, max_seq_len=256)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from hyena_glt import build_causal_lm
    from hyena_glt.heads import (
        HyenaGLTForSequenceRegression,
        HyenaGLTMultiTask,
        TaskSpec,
    )

    root = tmp_path_factory.mktemp("fuzz_models")
    build_causal_lm(tiny_config()).save_pretrained(root / "lm")
    HyenaGLTForSequenceRegression(tiny_config(), 1).save_pretrained(root / "head")
    HyenaGLTMultiTask(tiny_config(), {"a": TaskSpec("seq-cls", 2, 1.0, ["x", "y"]), "b": TaskSpec("regression", 1)}
                      ).save_pretrained(root / "multi")
    return {k: root / k for k in FILES}


@st.composite
def damaged_model_file(draw, models: dict[str, Path]) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(sorted(FILES)))
    name = draw(st.sampled_from(FILES[kind]))
    raw = (models[kind] / name).read_bytes()
    if draw(st.integers(0, 3)) == 0:
        return kind, name, draw(damaged(st.just(raw)))
    return kind, name, json_bytes(draw(damaged_tree(json.loads(raw))))


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


_NOT_JSON = object()


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return _NOT_JSON


def _small(raw: bytes) -> bool:
    data = _json(raw)
    return data is _NOT_JSON or all(abs(v) <= SMALL for v in _numbers(data) if v == v)


def _with(models, kind: str, name: str, raw: bytes, d: Path) -> Path:
    model = d / kind
    shutil.copytree(models[kind], model)
    (model / name).write_bytes(raw)
    return model


@pytest.fixture(scope="module")
def model_files(models):
    return damaged_model_file(models)


@budget(40)
@given(data=st.data())
def test_info_reads_a_damaged_model_file_or_exits_2_with_one_line(models, data):
    kind, name, raw = data.draw(damaged_model_file(models))
    with scratch() as d:
        model = _with(models, kind, name, raw, d)
        rc, _, err = run_cli("info", model, env={} if name == "checksums.json" else NO_VERIFY)
        if rc != 0:
            assert_one_line_error(rc, err, "info", model)


@budget(30)
@given(data=st.data())
def test_loading_a_damaged_model_file_works_or_exits_2_with_one_line(models, data):
    kind, name, raw = data.draw(damaged_model_file(models))
    if not _small(raw):  # built (allocated) before the weights are checked: sizes within bounds may not fit
        return
    with scratch() as d:
        model = _with(models, kind, name, raw, d)
        env = {} if name == "checksums.json" else NO_VERIFY
        if kind == "lm":
            rc, _, err = run_cli("generate", "--model", model, "--prompt", "ACGT", "--max-new-tokens", "2", env=env)
            command = "generate"
        else:
            task = ["--task", "a"] if kind == "multi" else []
            rc, _, err = run_cli("predict", "--model", model, *task, "--sequence", "ACGT", env=env)
            command = "predict"
        if rc != 0:
            assert_one_line_error(rc, err, command, model)


# ---------------------------------------------------------------------------- found by fuzzing


def _case(models, tmp_path, kind, name, text):
    model = tmp_path / kind
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(models[kind], model)
    (model / name).write_text(text)
    return model


def test_head_json_not_an_object_is_one_line(models, tmp_path):
    """head.json `[1, 2]` or `null`, or a task that is a list or null, gave AttributeError /
    TypeError tracebacks (hyena_glt/heads.py `load_head_model`, hyena_glt/pretrained.py
    `inspect_pretrained`, SavedModel.describe). Both now read it through heads.py
    `read_head_json`: one line naming head.json."""
    for i, text in enumerate(["[1, 2]", "null", '{"task": ["regression"], "num_labels": 1}',
                              '{"task": null, "num_labels": 1}']):
        model = _case(models, tmp_path / str(i), "head", "head.json", text)
        for args in (["info", model], ["predict", "--model", model, "--sequence", "ACGT"]):
            rc, _, err = run_cli(*args, env=NO_VERIFY)
            assert_one_line_error(rc, err, args[0], model)


def test_head_json_fields_of_the_wrong_type_are_one_line(models, tmp_path):
    """num_labels `"1"`, `1.5` or 10**12 (allocated), dropout `"x"` or NaN, label_names that are not
    one string per label reached the model constructor (TypeError tracebacks, or an allocation);
    `read_head_json` now checks each field: one line naming head.json and the field."""
    for i, head in enumerate(['{"task": "regression", "num_labels": "1", "dropout": 0.1, "label_names": null}',
                              '{"task": "regression", "num_labels": 1.5, "dropout": 0.1, "label_names": null}',
                              '{"task": "regression", "num_labels": 1, "dropout": "x", "label_names": null}',
                              '{"task": "regression", "num_labels": 1000000000000, "dropout": 0.1}',
                              '{"task": "regression", "num_labels": 1, "dropout": NaN}',
                              '{"task": "regression", "num_labels": 1, "label_names": ["a", "b"]}',
                              '{"task": "regression", "num_labels": 1, "label_names": "a"}']):
        model = _case(models, tmp_path / str(i), "head", "head.json", head)
        rc, _, err = run_cli("predict", "--model", model, "--sequence", "ACGT", env=NO_VERIFY)
        assert_one_line_error(rc, err, "predict", model)


def test_tasks_json_of_the_wrong_shape_is_one_line(models, tmp_path):
    """tasks.json `null` or {"tasks": [1]} (AttributeError in hyena_glt/pretrained.py
    `inspect_pretrained` and in heads.py), a task with an unknown key or without `kind` (TypeError
    from `TaskSpec(**t)`), no tasks, a weight that is not a number: heads.py `read_tasks_json`,
    used by both, now refuses each in one line naming tasks.json and the task."""
    cases = [("info", '{"dropout": 0.1, "tasks": [1]}'), ("predict", '{"dropout": 0.1, "tasks": [1]}'),
             ("info", "null"), ("predict", "null"),
             ("predict", '{"dropout": 0.1, "tasks": {"a": {"kind": "seq-cls", "colour": 1}}}'),
             ("predict", '{"dropout": 0.1, "tasks": {"a": {"num_labels": 2}}}'),
             ("info", '{"dropout": 0.1, "tasks": {}}'),
             ("predict", '{"dropout": 0.1, "tasks": {"a": {"kind": "regression", "num_labels": 1, "weight": "x"}}}')]
    for i, (command, tasks) in enumerate(cases):
        model = _case(models, tmp_path / str(i), "multi", "tasks.json", tasks)
        args = ["info", model] if command == "info" else ["predict", "--model", model, "--task", "a", "--sequence", "ACGT"]
        rc, _, err = run_cli(*args, env=NO_VERIFY)
        assert_one_line_error(rc, err, command, model)


def test_a_damaged_gzip_beside_the_bad_file_does_not_break_the_error_message(models, tmp_path):
    """The CLI finds the file a UTF-8 / JSON / YAML error came from by reading the command's files
    (launch/cli.py `_read`, gunzipping .gz ones). A damaged .gz among them (here a model directory
    with a damaged `notes.gz` and a config.json that is not UTF-8) raised zlib.error, which is no
    OSError: a traceback from inside the error mapping. `_read` now skips such a file."""
    import gzip

    from launch.cli import _read

    z = bytearray(gzip.compress(b">r1\nACGT\n" * 100, mtime=0))
    z[10] = 0  # the first deflate block becomes a stored block of bad length: zlib.error, not BadGzipFile
    model = _case(models, tmp_path, "lm", "a_notes.gz", "")
    (model / "a_notes.gz").write_bytes(bytes(z))
    assert _read(model / "a_notes.gz") is None
    config = (model / "config.json").read_bytes()
    (model / "config.json").write_bytes(config.replace(b'"pattern"', b'"patt\xffern"'))
    rc, _, err = run_cli("info", model, env=NO_VERIFY)
    assert_one_line_error(rc, err, "info", model / "config.json")
