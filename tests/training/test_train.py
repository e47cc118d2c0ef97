"""The trainer end to end: same per-step losses in every layout and ZeRO stage, exact resume,
preemption, non-finite steps, convert / reshard / eval, the deepspeed launcher.

Every run trains the tiny config (configs/tiny.yaml, pattern SDH*SDH*) for a few steps on
packed real genomes (E. coli for training, phage lambda held out), fp32, gloo, CPU.
Tolerance for "equal losses" across layouts: 1e-5 relative (float summation order differs
between layouts); resume on the same layout must be bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from support.training import (REPO, STEPS, SharedRuns, assert_close, assert_same_training, losses, metrics,
                              train, child_env as _env, cli_command as _cli)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def packs(tiny_packs):
    return tiny_packs


LAYOUTS = [
    pytest.param(2, ["parallel.tp=2"], id="tp2"),
    pytest.param(2, ["parallel.tp=2", "parallel.sp=true", "train.activation_checkpointing=true"], id="tp2-sp-recompute"),
    pytest.param(2, ["parallel.cp=2"], id="cp2"),
    pytest.param(2, ["parallel.pp=2"], id="pp2"),
    pytest.param(2, ["zero.stage=0"], id="dp2"),
    pytest.param(2, ["zero.stage=1"], id="dp2-zero1"),
    pytest.param(2, ["zero.stage=2"], id="dp2-zero2"),
    pytest.param(2, ["zero.stage=3"], id="dp2-zero3"),
    pytest.param(2, ["parallel.cp=2", "zero.stage=1"], id="cp2-zero1"),
    pytest.param(4, ["parallel.tp=2", "parallel.pp=2"], id="tp2-pp2"),
]


# The learned patcher: its gate travels between pipeline stages and its compression term is
# computed on whole sequences by every CP rank (megatron_adapters/merging.py).
MERGING = ["model.patching=learned", "model.patch_size=4", "model.pattern=SDH*", "train.steps=3"]
MERGING_LAYOUTS = [
    pytest.param(2, ["zero.stage=1"], id="dp2-zero1"),
    pytest.param(2, ["zero.stage=3"], id="dp2-zero3"),
    pytest.param(2, ["parallel.cp=2"], id="cp2"),
    pytest.param(2, ["parallel.pp=2"], id="pp2"),
    pytest.param(2, ["parallel.tp=2", "parallel.sp=true"], id="tp2-sp"),
    pytest.param(4, ["parallel.cp=2", "parallel.pp=2"], id="cp2-pp2"),
]
CURRICULUM = ["train.curriculum.enabled=true", "train.curriculum.start_seq_len=32", "train.curriculum.warmup_steps=3",
              "train.curriculum.multiple_of=16"]
# entropy: the adapted threshold (a buffer, not a parameter) must reach the checkpoint too.
TM = {p: [f"model.patching={p}", "model.patch_size=4", "model.pattern=SDH*", "model.entropy_adapt=true",
          "train.steps=3"] for p in ("static", "entropy")}

# Every from-scratch run the tests below read: name -> (processes, overrides). Each world
# size's runs share one launch (SharedRuns); the single-process ones are the references.
RUNS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    **{p.id: (p.values[0], p.values[1]) for p in LAYOUTS},
    "zero1-half": (2, ["zero.stage=1", "train.exit_after_steps=2"]),
    "tp2-half": (2, ["parallel.tp=2", "train.exit_after_steps=2"]),
    "pp2-vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),  # 4 micro-batches: a multiple of pp
    "pp2-vpp2-half": (2, ["parallel.pp=2", "parallel.vpp=2", "train.exit_after_steps=2"]),
    "curriculum-single": (1, CURRICULUM),
    "curriculum-cp2": (2, ["parallel.cp=2", *CURRICULUM]),
    "merging-single": (1, MERGING),
    **{f"merging-{p.id}": (p.values[0], [*MERGING, *p.values[1]]) for p in MERGING_LAYOUTS},
    **{f"tm-{p}-single": (1, TM[p]) for p in TM},
    "tm-static-tp2": (2, [*TM["static"], "parallel.tp=2", "train.activation_checkpointing=true"]),
    "tm-entropy-tp2": (2, [*TM["entropy"], "parallel.tp=2"]),
}


@pytest.fixture(scope="module")
def runs(packs, tmp_path_factory):
    return SharedRuns(packs, tmp_path_factory.mktemp("runs"), RUNS)


@pytest.fixture(scope="module")
def reference(runs):
    return runs("single")


@pytest.mark.parametrize("nproc,overrides", LAYOUTS)
def test_same_losses_gradients_and_weights_in_every_layout(runs, reference, request, nproc, overrides):
    run = runs(request.node.callspec.id)
    ref = losses(reference)
    assert len(ref) == STEPS and ref[-1] < ref[0]
    assert_same_training(run, reference)
    ref_val = [r for r in metrics(reference) if "val_loss" in r][-1]["val_loss"]
    val = [r for r in metrics(run) if "val_loss" in r][-1]["val_loss"]
    assert_close([val], [ref_val])
    row = metrics(run)[0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert key in row


@pytest.fixture(scope="module")
def zero1_runs(runs):
    """ZeRO-1 on 2 ranks: STEPS steps straight, and the same run stopped after 2 (its step-2
    checkpoint). Tests resume copies of the stopped run, never the run itself."""
    straight, half = runs("dp2-zero1"), runs("zero1-half")
    assert len(losses(half)) == 2 and (half / "ckpt" / "step_00000002" / "meta.json").is_file()
    return straight, half


def test_stop_and_resume_is_exact_and_works_on_another_dp_size(packs, zero1_runs, tmp_path):
    straight, stopped = zero1_runs
    half = tmp_path / "half"
    shutil.copytree(stopped, half)
    saved = half / "ckpt" / "step_00000002"
    # same layout: bit-identical per-step losses
    proc = train(packs, half, 2, "zero.stage=1")
    assert "resumed from" in proc.stdout + proc.stderr
    assert losses(half) == losses(straight)
    # a different data-parallel size (and ZeRO stage): same losses up to float rounding
    other = tmp_path / "other"
    other.mkdir()
    (other / "ckpt").mkdir()
    os.symlink(saved, other / "ckpt" / saved.name)
    proc = train(packs, other, 1, "zero.stage=0", launcher="python")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_close(losses(other), losses(straight)[2:])


@pytest.mark.slow
def test_zero1_checkpoint_resumes_under_zero3_with_its_optimizer_state(packs, zero1_runs, tmp_path):
    # Step 3's loss is computed before any resumed update; step 4's follows the ZeRO-3 update of
    # step 3, which uses the loaded Adam moments and step count, and the ZeRO-3 checkpoint it saved.
    straight, stopped = zero1_runs
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    proc = train(packs, run, 2, "zero.stage=3", "train.exit_after_steps=1")
    assert "resumed from" in proc.stdout + proc.stderr
    saved = json.loads((run / "ckpt" / "step_00000003" / "meta.json").read_text())
    assert saved["adam_step"] == 3 and saved["layout"]["zero_stage"] == 3
    proc = train(packs, run, 1, "zero.stage=0", launcher="python")  # ZeRO-3 -> no ZeRO
    assert "resumed from" in proc.stdout + proc.stderr
    assert_close(losses(run), losses(straight))


def test_nonfinite_losses_skip_then_stop_with_checkpoint(packs, tmp_path):
    proc = train(packs, tmp_path, 1, "train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0",
                 "train.max_nonfinite_steps=2", "train.steps=20", launcher="python", check=False)
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    assert "non-finite losses in a row" in proc.stderr
    rows = metrics(tmp_path)
    assert sum(1 for r in rows if r.get("skipped")) == 2
    assert (tmp_path / "ckpt" / "latest").is_file()


def test_convert_tp2_pp2_then_eval_matches_distributed_eval(packs, runs, tmp_path):
    run = runs("tp2-pp2")
    dist_val = [r for r in metrics(run) if "val_loss" in r][-1]["val_loss"]
    model = tmp_path / "model"
    proc = subprocess.run([*_cli(), "convert", str(run / "ckpt"), str(model), "--verify"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "verify: max |logit difference|" in proc.stdout and "OK" in proc.stdout
    ev = subprocess.run([*_cli(), "eval", "--model", str(model), "--data", str(packs / "val"), "--batch-size", "2",
                         "--max-windows", "4"], cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert_close([result["loss"]], [dist_val])
    assert result["bits_per_base"] == pytest.approx(result["loss"] / 0.6931471805599453)


@pytest.mark.slow
def test_interleaved_pipeline_same_losses_as_plain_1f1b(runs):
    plain, interleaved = runs("pp2"), runs("pp2-vpp2")
    assert_same_training(interleaved, plain)
    vals = [[r for r in metrics(run) if "val_loss" in r][-1]["val_loss"] for run in (interleaved, plain)]
    assert_close(vals[:1], vals[1:])


@pytest.mark.slow
def test_interleaved_checkpoint_converts_and_reshards_to_plain_1f1b(packs, runs, reference, tmp_path):
    run = runs("pp2-vpp2-half")
    saved = run / "ckpt" / "step_00000002"
    assert json.loads((saved / "meta.json").read_text())["layout"]["vpp"] == 2
    proc = subprocess.run([*_cli(), "convert", str(saved), str(tmp_path / "model"), "--verify"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "vpp=2" in proc.stdout and "OK" in proc.stdout  # the probe ran in the interleaved layout
    resharded = tmp_path / "resharded"
    subprocess.run([*_cli(), "reshard", str(run / "ckpt"), str(resharded / "ckpt"), "parallel.vpp=1"], check=True,
                   cwd=REPO, env=_env(), capture_output=True)
    assert json.loads((resharded / "ckpt" / "step_00000002" / "meta.json").read_text())["layout"]["vpp"] == 1
    proc = train(packs, resharded, 2, "parallel.pp=2")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_close(losses(resharded), losses(reference)[2:])


def test_reshard_tp2_to_tp1_continues_with_identical_losses(packs, runs, tmp_path):
    straight, half = runs("tp2"), runs("tp2-half")
    resharded = tmp_path / "resharded"
    subprocess.run([*_cli(), "reshard", str(half / "ckpt"), str(resharded / "ckpt"), "parallel.tp=1"], check=True,
                   cwd=REPO, env=_env(), capture_output=True)
    assert sorted(p.name for p in (resharded / "ckpt" / "step_00000002").glob("*.safetensors")) == [
        "model-tp00-pp00.safetensors", "optim-tp00-pp00.safetensors"]
    proc = train(packs, resharded, 1, "parallel.tp=1", launcher="python")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_close(losses(resharded), losses(straight)[2:])


def test_deepspeed_launcher_runs(packs, tmp_path, reference):
    train(packs, tmp_path, 2, "zero.stage=2", launcher="deepspeed")
    assert_close(losses(tmp_path), losses(reference))


def test_killed_rank_restarts_and_resumes_from_latest_checkpoint(packs, tmp_path):
    import psutil

    # Restarted workers must not reuse the first attempt's rendezvous store (stale gloo keys):
    # the README tells users to export this for --max-restarts, and so does launch/cluster/slurm.sbatch.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        proc = train(packs, tmp_path, 2, "train.steps=8", "checkpoint.every=2", extra=["--max-restarts", "1"],
                     wait=False)
    finally:
        del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "ckpt" / "step_00000002" / "meta.json").is_file():
        time.sleep(0.3)
    while time.time() < deadline and len((tmp_path / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "launch.cli" in " ".join(c.cmdline())]
    assert workers, "no worker processes found"
    workers[-1].kill()  # a rank dies hard (no checkpoint of its own)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    # the survivor, blocked in a collective with the dead rank, leaves on torchrun's SIGTERM
    # after its grace (10 s) instead of the agent's SIGKILL 30 s later
    assert "the step in progress has not ended (a peer rank is gone)" in out, out[-4000:]
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    by_step: dict[int, list[float]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert sorted(by_step) == list(range(1, 9))
    # steps run twice (logged before the kill, then again after the restart) are bit-identical
    assert all(len(set(v)) == 1 for v in by_step.values()), by_step


def test_curriculum_sequence_length_warmup_same_under_context_parallel(runs):
    single, cp2 = runs("curriculum-single"), runs("curriculum-cp2")
    rows = [r for r in metrics(single) if "loss" in r]
    assert [r["seq_len"] for r in rows] == [32, 64, 64, 128]
    assert [r["tokens"] for r in rows] == [1024, 2048, 3072, 4096]  # split mode: same tokens per step
    assert_same_training(cp2, single)


@pytest.mark.parametrize("nproc,overrides", MERGING_LAYOUTS)
def test_token_merging_same_losses_in_every_layout(runs, request, tmp_path, nproc, overrides):
    run = runs(f"merging-{request.node.callspec.id}")
    assert_same_training(run, runs("merging-single"))
    if "parallel.pp=2" in overrides and nproc == 2:  # a pipelined U-shape converts to the single-device model
        model = tmp_path / "model"
        subprocess.run([*_cli(), "convert", str(run / "ckpt"), str(model), "--verify"], check=True, cwd=REPO,
                       env=_env(), capture_output=True)
        from hyena_glt import load_causal_lm

        assert type(load_causal_lm(model)).__name__ == "BLTForCausalLM"


@pytest.mark.parametrize("patching", ["static", "entropy"])
def test_token_merging_trains_under_tensor_parallel_with_the_same_losses(runs, tmp_path, patching):
    single, tp2 = runs(f"tm-{patching}-single"), runs(f"tm-{patching}-tp2")
    assert_same_training(tp2, single)
    models = {}
    for run in (single, tp2):
        verify = ["--verify"] if run == tp2 else []  # the TP=2 model on a probe batch == the converted one
        subprocess.run([*_cli(), "convert", str(run / "ckpt"), str(tmp_path / f"model-{run.name}"), *verify],
                       check=True, cwd=REPO, env=_env(), capture_output=True)
        from hyena_glt import load_causal_lm

        models[run.name] = load_causal_lm(tmp_path / f"model-{run.name}")
    # Weights after Adam are not compared element-wise (a near-zero gradient's update direction
    # flips on rounding); the converted models' losses on a batch are.
    ids = torch.randint(4, 260, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (m.eval()(ids[:, :-1], labels=ids[:, 1:]).loss.item() for m in models.values())
    assert abs(a - b) <= 1e-4 * abs(a), (a, b)
    if patching == "entropy":
        t = [float(m.model.patcher.threshold) for m in models.values()]
        assert t[0] != 1.0 and abs(t[0] - t[1]) <= 1e-4 * abs(t[0]), t  # adapted, and saved by both layouts
