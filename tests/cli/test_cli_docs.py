"""The docs say what the code is.

* docs/cli.md below its marker is generated from the argparse tree (launch/cli_docs.py): the
  test regenerates it and fails on any difference, so a new command or option cannot go
  undocumented.
* docs/model-config.md below its marker is generated from HyenaGLTConfig the same way: every
  field with its type, default, rule and description (every field must have one), and each
  rule it states is one the config enforces.
* Every repository path that README.md and docs/*.md name (`launch/...`, `hyena_glt/...`,
  `data_tools/...`, `megatron_adapters/...`, `tests/...`, `configs/...`, `data/genomes/...`,
  `data/variants/...`; an upper-case part such as `NAME` stands for any name) exists, and so
  does every bare file name of a package table (`build.py`); every module run with
  `python -m X`, `torchrun -m X` or `deepspeed --module X` imports; every dotted name of a
  project module (`hyena_glt.registry.family_of`) imports; every relative link points to a
  file and, with `#anchor`, to one of its headings.

Run it after moving or renaming a file.
"""

from __future__ import annotations

import difflib
import glob
import importlib
import json
import re
from pathlib import Path

import pytest

from launch import cli_docs
from launch.cli import COMMAND_MODULES, build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REGENERATE = "regenerate it with `.venv/bin/python -m launch.cli_docs --write` and commit docs/cli.md"
REGENERATE_CONFIG = ("regenerate it with `.venv/bin/python -m launch.cli_docs --write` and commit "
                     "docs/model-config.md")

PACKAGES = ("launch", "hyena_glt", "data_tools", "megatron_adapters")
PATH_PREFIXES = (*PACKAGES, "tests", "configs", "data/genomes", "data/variants")
_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(p) for p in PATH_PREFIXES) + r")/[\w./*{},-]*)")
_MODULE_RUN = re.compile(r"(?:\s-m|--module) ([A-Za-z_][\w.]*)")  # python -m X, torchrun -m X, deepspeed --module X
_DOTTED = re.compile(r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```")


def _mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(where, match) for every match in README.md and docs/*.md."""
    found = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            found += [(f"{doc.relative_to(REPO)}:{n}", m.group(1)) for m in pattern.finditer(line)]
    return found


def _braces(text: str) -> list[str]:
    """`a_{1,2}.yaml` -> [`a_1.yaml`, `a_2.yaml`] (shell brace expansion, one level per pass)."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [x for part in m.group(1).split(",") for x in _braces(text[: m.start()] + part + text[m.end():])]


# ---------------------------------------------------------------------------- docs/cli.md


def test_cli_md_is_generated_from_the_parser():
    want, have = cli_docs.render(), cli_docs.DOC.read_text(encoding="utf-8")
    if want != have:
        diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "docs/cli.md",
                                                 "generated", n=1))[:60])
        pytest.fail(f"docs/cli.md is not what the argparse tree generates: {REGENERATE}\n{diff}")


def test_every_command_and_nested_command_has_a_section():
    text = cli_docs.generated()
    paths = [p for p, _, _ in cli_docs._commands(build_parser())]
    names = {" ".join(p) for p in paths}
    assert {c for cs in COMMAND_MODULES.values() for c in cs} <= names
    assert {"data stats", "bench cp", "bench gpu", "import-evo2", "export-vortex"} <= names
    for p in paths:
        assert f"\n### hyena-glt {' '.join(p)}\n" in text, p
    assert "/work/" not in text and str(REPO) not in text  # no machine-specific default


def test_the_page_does_not_depend_on_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = cli_docs.generated()
    monkeypatch.setenv("COLUMNS", "300")
    assert cli_docs.generated() == narrow


def test_generator_renders_options_and_escapes_table_cells():
    import argparse

    parser = argparse.ArgumentParser(prog="hyena-glt")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("x", help="does x")
    p.add_argument("src", help="input")
    p.add_argument("--mode", choices=["a", "b"], default="a", help="a|b, default %(default)s")
    p.add_argument("--flag", action="store_true", help="writes <i>.npy")
    p.add_argument("--many", nargs="+", type=int, default=[1, 2])
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    nested = sub.add_parser("y", help="group").add_subparsers(dest="action", metavar="ACTION")
    nested.add_parser("z", help="nested one")
    text = cli_docs.generated(parser)
    assert "| `src` | required | input |" in text
    assert "| `--mode {a,b}` | `a` | a\\|b, default a |" in text
    assert "| `--flag` | off | writes &lt;i>.npy |" in text
    assert "| `--many MANY [MANY ...]` | `1 2` |  |" in text
    assert "--hidden" not in text
    assert "### hyena-glt y z\n\nNested one.\n" in text and "[`z`](#hyena-glt-y-z)" in text


# ---------------------------------------------------------------------------- docs/model-config.md


def test_model_config_md_is_generated_from_the_config():
    want, have = cli_docs.render_config(), cli_docs.CONFIG_DOC.read_text(encoding="utf-8")
    if want != have:
        diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                                 "docs/model-config.md", "generated", n=1))[:60])
        pytest.fail(f"docs/model-config.md is not what HyenaGLTConfig generates: {REGENERATE_CONFIG}\n{diff}")


def test_every_config_field_has_a_row_with_its_default_and_a_description():
    from hyena_glt.config import HyenaGLTConfig

    rows = {r["name"]: r for r in cli_docs.config_fields()}
    assert list(rows) == list(HyenaGLTConfig.model_fields)
    undescribed = [n for n, r in rows.items() if not r["description"]]
    assert not undescribed, f"HyenaGLTConfig fields without a description (Field(description=...)): {undescribed}"
    default = HyenaGLTConfig()
    for name, r in rows.items():  # the documented default is the one a config gets
        assert json.loads(r["default"]) == getattr(default, name), name
    assert rows["d_model"]["rule"].startswith("> 0") and rows["soft_mask_weight"]["rule"] == "in [0, 1]"
    assert rows["motif_kernel_sizes"]["type"] == "list[int]" and rows["mlp_hidden_size"]["type"] == "int | None"
    text = cli_docs.config_generated()
    assert "| `vocab_size` | `int` | `260` | >= 260" in text


# One config breaking each rule that config_rules() documents: the config refuses it, naming the field.
_BROKEN = {
    "pattern": {"pattern": "S||D"},
    "d_model": {"d_model": 250},
    "num_heads": {"d_model": 256, "num_heads": 3},
    "vocab_size": {"vocab_size": 259},
    "mlp_activation": {"mlp_activation": "relu"},
    "first_mlp_activation": {"first_mlp_activation": "relu"},
    "num_filter_groups": {"num_filter_groups": 24},
    "medium_decay_min": {"medium_decay_min": 2.0},
    "medium_decay_max": {"medium_decay_max": 0.001},
    "norm_eps_placement": {"norm_eps_placement": "middle"},
    "motif_kernel_sizes": {"motif_kernel_sizes": []},
    "patching": {"patching": "dynamic"},
    "patch_size": {"patching": "static", "patch_size": 3.5},
    "min_patch": {"patching": "static", "min_patch": 5, "max_patch": 4},
    "max_patch": {"patching": "static", "min_patch": 5, "max_patch": 4},
    "patch_budget": {"patching": "learned", "patch_budget": 0.01},
    "local_encoder_pattern": {"local_encoder_pattern": "S|S"},
    "local_decoder_pattern": {"local_decoder_pattern": ""},
    "position_periods": {"position_periods": [1]},
    "entropy_mode": {"entropy_mode": "greedy"},
    "patch_adapt": {"patching": "static", "patch_adapt": True},
    "entropy_pattern": {"entropy_pattern": "Q"},
    "entropy_d_model": {"patching": "entropy", "entropy_d_model": 24},
    "merge_relaxation": {"merge_relaxation": "gumbel"},
}


def test_documented_config_rules_are_enforced():
    from hyena_glt.config import HyenaGLTConfig

    rules = cli_docs.config_rules()
    assert set(rules) <= set(HyenaGLTConfig.model_fields), "config_rules names fields the config does not have"
    assert set(rules) == set(_BROKEN), "add a breaking config to _BROKEN for every documented rule"
    for field, values in _BROKEN.items():
        with pytest.raises(ValueError, match=field):
            HyenaGLTConfig(**values)


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    cli = tmp_path / "cli.md"
    cli.write_text(cli_docs.render())  # current, whatever the commands' help says today
    stale = tmp_path / "model-config.md"
    stale.write_text(cli_docs.CONFIG_DOC.read_text(encoding="utf-8").replace("| `d_model` |", "| `width` |"))
    monkeypatch.setattr(cli_docs, "DOC", cli)
    monkeypatch.setattr(cli_docs, "CONFIG_DOC", stale)
    assert cli_docs.main(["--check"]) == 1 and "model-config.md is out of date" in capsys.readouterr().err
    stale.write_text(cli_docs.render_config(stale))
    assert cli_docs.main(["--check"]) == 0


# ---------------------------------------------------------------------------- paths and names


def _placeholders(path: str) -> str:
    """`launch/bench/NAME.py` -> `launch/bench/*.py`: an upper-case part stands for any name."""
    return "/".join(re.sub(r"^[A-Z][A-Z_]*(?=$|\.)", "*", part) for part in path.split("/"))


def test_paths_named_in_the_docs_exist():
    missing = []
    for where, raw in _mentions(_PATH):
        path = raw.rstrip(".,:;")
        if not any(glob.glob(str(REPO / _placeholders(p))) for p in _braces(path)):
            missing.append(f"{where}: {path}")
    assert not missing, "paths named in README.md / docs/*.md that do not exist:\n  " + "\n  ".join(missing)


def test_python_m_modules_in_the_docs_import():
    """`python -m X`, `torchrun ... -m X`, `deepspeed ... --module X`: X imports."""
    missing = []
    for where, module in _mentions(_MODULE_RUN):
        if module.split(".")[0] in ("pytest", "pip", "venv", "torch"):
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{where}: -m {module} ({e})")
    assert not missing, "modules named in README.md / docs/*.md that do not exist:\n  " + "\n  ".join(missing)


def test_dotted_names_in_the_docs_import():
    """`hyena_glt.registry`, `launch.inference.variants.window_log_likelihoods`: the longest
    prefix that is a module of the checkout imports, and the rest are attributes of it."""
    bad = []
    for where, name in sorted(set(_mentions(_DOTTED)), key=lambda x: x[0]):
        name = name.rstrip(".")
        parts = name.split(".")
        k = max((i for i in range(1, len(parts) + 1)
                 if (REPO.joinpath(*parts[:i]).with_suffix(".py")).is_file()
                 or (REPO.joinpath(*parts[:i]) / "__init__.py").is_file()), default=0)
        if k == 0:
            bad.append(f"{where}: {name} (no such module)")
            continue
        try:
            obj = importlib.import_module(".".join(parts[:k]))
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            bad.append(f"{where}: {name} ({e})")
    assert not bad, "names in README.md / docs/*.md that do not import:\n  " + "\n  ".join(bad)


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (code blocks left out)."""
    out, seen, fenced = set(), {}, False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_in_the_docs_resolve():
    bad = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in _LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                path = (doc.parent / file).resolve() if file else doc
                where = f"{doc.relative_to(REPO)}:{n}: {target}"
                if not path.exists():
                    bad.append(f"{where} (no such file)")
                elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                    bad.append(f"{where} (no such heading)")
    assert not bad, "links in README.md / docs/*.md that lead nowhere:\n  " + "\n  ".join(bad)


_BARE = re.compile(r"`((?:[\w-]+/)*[\w-]+\.(?:py|sh|sbatch))`")


def test_file_names_in_the_docs_exist_somewhere():
    """A bare `file.py` (tables of a package's files name them without the directory) is the
    name of some file of the checkout, so a renamed module cannot stay in a table."""
    have = {p.relative_to(REPO).as_posix() for d in (*PACKAGES, "tests", "data")
            for p in (REPO / d).rglob("*") if p.is_file()}
    missing = [f"{where}: {name}" for where, name in _mentions(_BARE)
               if not name.startswith(tuple(p + "/" for p in PATH_PREFIXES))  # checked above, with placeholders
               and not any(h == name or h.endswith("/" + name) for h in have)]
    assert not missing, "file names in README.md / docs/*.md that no file has:\n  " + "\n  ".join(missing)
