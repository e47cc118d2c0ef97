"""Every parallel layout equals the single-process model (same seed, same batch).

The cases run in tests/support/parallel_worker.py under torchrun (gloo, CPU), one launch per
world size for all its cases (each case still reported and asserted on its own). The worker compares, in
fp64 unless stated, the gathered logits, the loss and every parameter gradient (gathered to
full shape) with the single-process HyenaGLTForCausalLM (BLTForCausalLM for token merging),
and the initial weights bit for bit.
Tolerance per tensor: |parallel - reference| <= 1e-10 * max|reference| + 1e-13 (fp64),
1e-5 * max|reference| + 1e-6 (fp32). Pattern "SDH*SDH*" (all of S, D, H, *) unless stated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "support" / "parallel_worker.py"

LAYOUTS = [
    pytest.param(2, ["--tp", "2"], id="tp2"),
    pytest.param(2, ["--tp", "2", "--sp", "--untied", "--genomic"], id="tp2-sp-untied-genomic"),
    pytest.param(2, ["--tp", "2", "--sp", "--dtype", "float32"], id="tp2-sp-fp32"),
    # L=128: the H filter carries the first chunk to the last position; the worker also checks a
    # CP that convolves its shards separately fails.
    # Context parallel runs D/H by halo + modal state (the default) and by all-to-all: both here.
    pytest.param(2, ["--cp", "2", "--seq-len", "128", "--long-filter-check"], id="cp2-long-filter"),
    pytest.param(2, ["--cp", "2", "--seq-len", "128", "--long-filter-check", "--cp-long-conv", "all2all"],
                 id="cp2-long-filter-all2all"),
    # A 32-tap D filter needs a 31-position halo; 16-position chunks send D through the all-to-all.
    pytest.param(2, ["--cp", "2", "--medium-filter-len", "32"], id="cp2-state-short-chunks"),
    pytest.param(2, ["--pp", "2", "--micro-batches", "4"], id="pp2-1f1b"),
    pytest.param(2, ["--pp", "2", "--micro-batches", "4", "--pattern", "SDH*SD|H*"], id="pp2-uneven-6-2"),
    pytest.param(2, ["--pp", "2", "--vpp", "2", "--micro-batches", "4"], id="pp2-vpp2-interleaved"),
    pytest.param(2, ["--micro-batches", "2"], id="dp2"),
    pytest.param(4, ["--tp", "2", "--cp", "2", "--sp", "--genomic"], id="tp2-cp2-sp-genomic"),
    pytest.param(4, ["--tp", "2", "--cp", "2", "--sp", "--genomic", "--cp-long-conv", "all2all"],
                 id="tp2-cp2-sp-genomic-all2all"),
    pytest.param(4, ["--tp", "2", "--pp", "2", "--sp", "--micro-batches", "4"], id="tp2-pp2-sp"),
    pytest.param(4, ["--cp", "2", "--pp", "2", "--micro-batches", "4"], id="cp2-pp2"),
    pytest.param(4, ["--cp", "2", "--pp", "2", "--micro-batches", "4", "--cp-long-conv", "all2all"], id="cp2-pp2-all2all"),
    # Every Evo-2-shaped option (eps outside the norm's sqrt, mixer output bias, GELU then
    # identity MLPs, raw D taps, S without skip, MLP width, RoPE position scale, vocab 512).
    pytest.param(2, ["--tp", "2", "--sp", "--evo2"], id="tp2-sp-evo2"),
    pytest.param(2, ["--cp", "2", "--seq-len", "128", "--evo2"], id="cp2-evo2"),
    pytest.param(2, ["--cp", "2", "--seq-len", "128", "--evo2", "--cp-long-conv", "all2all"], id="cp2-evo2-all2all"),
    pytest.param(2, ["--pp", "2", "--micro-batches", "4", "--evo2"], id="pp2-evo2"),
    pytest.param(4, ["--tp", "2", "--cp", "2", "--sp", "--evo2"], id="tp2-cp2-sp-evo2"),
    pytest.param(4, ["--tp", "2", "--cp", "2", "--sp", "--evo2", "--cp-long-conv", "all2all"], id="tp2-cp2-sp-evo2-all2all"),
    # Token merging (the U-shape, megatron_adapters/merging.py): every block sharded, the
    # patcher / position system / bridge replicated; each patcher, and DP x TP.
    pytest.param(2, ["--tp", "2", "--patching", "static"], id="tp2-merging-static"),
    pytest.param(2, ["--tp", "2", "--patching", "entropy"], id="tp2-merging-entropy"),
    pytest.param(2, ["--tp", "2", "--patching", "learned", "--untied", "--genomic"], id="tp2-merging-learned-untied-genomic"),
    pytest.param(4, ["--tp", "2", "--patching", "learned"], id="tp2-dp2-merging-learned"),
    # The lookahead (optimal, DP) entropy patcher: its lagged bridge read under TP.
    pytest.param(2, ["--tp", "2", "--patching", "optimal"], id="tp2-merging-optimal"),
    # ... and under CP, SP and PP: patches crossing the zigzag / SP borders pooled exactly, the
    # patch stream, byte states and boundaries (+ gate) carried between pipeline stages.
    pytest.param(2, ["--cp", "2", "--patching", "learned", "--genomic"], id="cp2-merging-learned-genomic"),
    pytest.param(2, ["--cp", "2", "--patching", "optimal", "--cp-long-conv", "all2all"], id="cp2-all2all-merging-optimal"),
    pytest.param(2, ["--tp", "2", "--sp", "--patching", "entropy"], id="tp2-sp-merging-entropy"),
    pytest.param(2, ["--pp", "2", "--vpp", "2", "--patching", "static", "--untied"], id="pp2-vpp2-merging-static-untied"),
    pytest.param(4, ["--cp", "2", "--pp", "2", "--patching", "learned", "--genomic"], id="cp2-pp2-merging-learned-genomic"),
    pytest.param(4, ["--tp", "2", "--sp", "--cp", "2", "--patching", "entropy"], id="tp2-sp-cp2-merging-entropy"),
]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One torchrun launch per world size runs every case of that size (the worker's --cases),
    started on first use; each test then reads its own case's verdict."""
    results: dict[int, tuple[dict[str, str], str]] = {}

    def run(nproc: int) -> tuple[dict[str, str], str]:
        if nproc not in results:
            cases = [{"id": p.id, "args": p.values[1]} for p in LAYOUTS if p.values[0] == nproc]
            spec = tmp_path_factory.mktemp(f"cases{nproc}") / "cases.json"
            spec.write_text(json.dumps(cases))
            cmd = _torchrun() + [
                "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                str(WORKER), "--cases", str(spec),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300 * len(cases))
            verdicts = {}
            for line in proc.stdout.splitlines():
                if line.startswith("CASE "):
                    _, case_id, verdict = line.split(" ", 3)[:3]
                    verdicts[case_id] = line
            results[nproc] = verdicts, f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        return results[nproc]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,args", LAYOUTS)
def test_layout_matches_single_process(launches, request, nproc: int, args: list[str]) -> None:
    case_id = request.node.callspec.id
    verdicts, tail = launches(nproc)
    assert case_id in verdicts, f"case {case_id} did not finish:\n{tail}"
    assert verdicts[case_id].split(" ", 3)[2] == "OK", f"{verdicts[case_id]}\n{tail}"
