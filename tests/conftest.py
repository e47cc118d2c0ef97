from pathlib import Path

import pytest

from launch.net import free_port  # noqa: F401  (the tests' one port helper)

REPO = Path(__file__).resolve().parents[1]
BUNDLED_GENOMES = REPO / "data" / "genomes"
# CI and developers have the project's shared/ folder beside the checkout.
SHARED_GENOMES = REPO.parent / "shared" / "data" / "genomes"


def genome_path(name: str) -> Path:
    for d in (BUNDLED_GENOMES, SHARED_GENOMES):
        if (d / name).exists():
            return d / name
    pytest.skip(f"genome {name} not found in {BUNDLED_GENOMES} or {SHARED_GENOMES}")


@pytest.fixture
def ecoli() -> Path:
    return genome_path("ecoli_k12_w3110.fasta.gz")


@pytest.fixture
def lambda_phage() -> Path:
    return genome_path("lambda_phage.fasta.gz")


@pytest.fixture
def nmasked_contig() -> Path:
    return genome_path("ecoli_contig_nmasked.fasta.gz")


@pytest.fixture
def diphtheriae() -> Path:
    return genome_path("c_diphtheriae_nctc11397.fasta.gz")




@pytest.fixture(autouse=True)
def _torch_threads(monkeypatch, tmp_path):
    # Keep DeepSpeed's JIT builds and caches out of the user's home.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    yield


def run_cli(*args) -> tuple[int, str, str]:
    """`hyena-glt ARGS` in this process: (exit status, stdout, stderr). Warnings (library
    deprecations) are kept off stderr, as pytest does; argparse's exit is an exit status."""
    import contextlib
    import io
    import warnings

    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()
