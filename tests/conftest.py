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


@pytest.fixture(scope="session")
def tiny_packs(tmp_path_factory) -> Path:
    """The packs the tiny trainer runs use (as tests/training/test_train.py's `packs`): E. coli
    K-12 as training windows (DIR/train) and phage lambda held out (DIR/val), seq-len 128."""
    d = tmp_path_factory.mktemp("tiny_packs")
    for name, out, val in (("ecoli_k12_w3110.fasta.gz", "train", "0"), ("lambda_phage.fasta.gz", "val", "1")):
        rc, _, err = run_cli("pack", genome_path(name), "--out", d / out, "--seq-len", "128", "--val-fraction", val,
                             "--progress", "none")
        assert rc == 0, err
    return d


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """torch on one thread in the test process, and OMP_NUM_THREADS=1 for the processes it
    starts: the tiny models gain nothing from a second thread, and under load (other processes
    on the 2 cores) OpenMP's waiting threads made single tests 10-20x slower (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vortex_available() -> None:
    """Vortex (PyPI vtx==1.1.0), what the Evo 2 interop tests compare against. Missing: the
    test is skipped (a developer without vtx), or fails with the reason when
    HYENA_GLT_REQUIRE_VTX=1 (what `make test` sets: there a missing vtx is a broken install)."""
    import os

    from support.evo2_oracle import vortex_unavailable_reason

    reason = vortex_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("HYENA_GLT_REQUIRE_VTX", "") not in ("", "0"):
        pytest.fail(f"HYENA_GLT_REQUIRE_VTX is set and {reason}", pytrace=False)
    pytest.skip(reason)




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
