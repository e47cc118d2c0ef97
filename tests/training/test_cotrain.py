"""Task heads co-trained with the language model in `hyena-glt train` (`tasks:`): the same
per-step losses under TP=2 as in one process (total, LM and each task's), across a stop and
resume; per-task entries in metrics.jsonl; the checkpoint converts into the LM and a
multi-task model that predicts and fine-tunes; config errors are one line.

Runs train the tiny config (tests/training/test_train.py's helpers) on packed phage lambda with two
tasks from small generated label files: a sequence class (GC-rich or not, with a val file)
and per-base labels (G/C or not).
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import genome_path, run_cli
from support.training import (REPO, assert_close, assert_same_training, metrics, train, child_env as _env,
                              cli_command as _cli)

pytestmark = pytest.mark.distributed
WEIGHTS = {"gc": 0.5, "coding": 2.0}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("packs")
    for out, val in (("train", "0"), ("val", "1")):
        subprocess.run([*_cli(), "pack", str(genome_path("lambda_phage.fasta.gz")), "--out", str(d / out), "--seq-len",
                        "128", "--val-fraction", val, "--progress", "none"], check=True, cwd=REPO, env=_env(),
                       capture_output=True)
    return d


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    for split, n in (("train", 24), ("val", 7)):
        gc = [0.7 if i % 2 else 0.3 for i in range(n)]
        seqs = ["".join(rng.choice("GC" if rng.random() < p else "AT") for _ in range(rng.randint(20, 90))) for p in gc]
        (d / f"gc_{split}.csv").write_text("sequence,label\n" + "".join(
            f"{s},{'rich' if i % 2 else 'poor'}\n" for i, s in enumerate(seqs)))
        (d / f"coding_{split}.tsv").write_text("sequence\tlabel\n" + "".join(
            f"{s}\t{''.join('1' if c in 'GC' else '0' for c in s)}\n" for s in seqs))
    return d


def task_overrides(d: Path) -> list[str]:
    return ["tasks.gc.kind=seq-cls", f"tasks.gc.train={d / 'gc_train.csv'}", f"tasks.gc.val={d / 'gc_val.csv'}",
            f"tasks.gc.weight={WEIGHTS['gc']}", "tasks.gc.global_batch_size=4",
            "tasks.coding.kind=token-cls", f"tasks.coding.train={d / 'coding_train.tsv'}",
            f"tasks.coding.weight={WEIGHTS['coding']}"]


def step_rows(out: Path) -> list[dict]:
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once, a resume included
    return rows


@pytest.fixture(scope="module")
def single(packs, task_files, tmp_path_factory) -> Path:
    """One process, stopped after 2 steps and resumed from its checkpoint."""
    out = tmp_path_factory.mktemp("single")
    train(packs, out, 1, *task_overrides(task_files), "train.exit_after_steps=2", launcher="python")
    proc = train(packs, out, 1, *task_overrides(task_files), launcher="python")
    assert "resumed from" in proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def tp2(packs, task_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp2")
    train(packs, out, 2, *task_overrides(task_files), "parallel.tp=2")
    return out


def test_tp2_equals_one_process_per_step_total_lm_and_task_losses(single, tp2):
    ref, run = step_rows(single), step_rows(tp2)
    for key in ("loss", "lm_loss", "task/gc/loss", "task/coding/loss"):
        assert_close([r[key] for r in run], [r[key] for r in ref])
    assert_same_training(tp2, single)  # + gradient norms and final weights
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"] and ref[-1]["task/coding/loss"] < ref[0]["task/coding/loss"]
    vals = [[r for r in metrics(out) if "task/gc/val_n" in r][-1] for out in (single, tp2)]
    assert vals[0]["task/gc/val_n"] == vals[1]["task/gc/val_n"] == 7
    assert_close([vals[1]["val_loss"]], [vals[0]["val_loss"]])


def test_metrics_hold_the_objective_its_parts_and_task_validation(single):
    for r in step_rows(single):
        parts = r["lm_loss"] + sum(w * r[f"task/{n}/loss"] for n, w in WEIGHTS.items())
        assert r["loss"] == pytest.approx(parts, rel=1e-12)
    final = metrics(single)[-1]
    for key in ("val_loss", "task/gc/val_accuracy", "task/gc/val_mcc", "task/gc/val_f1"):
        assert key in final
    assert not any(k.startswith("task/coding/val") for k in final)  # no val file for it


def test_checkpoint_converts_to_the_lm_and_a_multitask_model_that_predicts_and_finetunes(tp2, task_files, tmp_path):
    from hyena_glt import load_causal_lm
    from hyena_glt.heads import HyenaGLTMultiTask

    out = tmp_path / "model"
    rc, stdout, stderr = run_cli("convert", tp2 / "ckpt", out)
    assert rc == 0, stderr
    lm = load_causal_lm(out)  # the language model converts as without tasks
    multi = HyenaGLTMultiTask.from_pretrained(out / "tasks")
    assert multi.tasks["gc"].label_names == ["poor", "rich"] and multi.tasks["coding"].kind == "token-cls"
    lm_state = lm.state_dict()
    assert all((v == lm_state[k]).all() for k, v in multi.state_dict().items() if k.startswith("model."))
    rc, stdout, _ = run_cli("predict", "--model", out / "tasks", "--task", "gc", "--input", task_files / "gc_val.csv")
    assert rc == 0 and stdout.splitlines()[-1].startswith("metrics: accuracy")
    rc, stdout, stderr = run_cli("finetune", "--model", out, "--task", "seq-cls", "--train", task_files / "gc_train.csv",
                                 "--out", tmp_path / "ft", "--max-steps", "2", "--batch-size", "8")
    assert rc == 0 and (tmp_path / "ft" / "head.json").is_file(), stderr


def test_config_errors_are_one_line(packs, task_files, tmp_path, single):
    from launch.training.config import TrainConfig

    base = ["--config", REPO / "configs" / "tiny.yaml", f"data.train={packs / 'train'}", f"out_dir={tmp_path}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "train.seq_len=128", "train.micro_batch_size=2",
            "train.global_batch_size=8", *task_overrides(task_files)]
    for extra, message in (
        (["tasks.gc.kind=ranking"], "tasks.gc.kind: task kind: must be one of seq-cls, token-cls, regression"),
        (["tasks.gc.weight=0"], "tasks.gc.weight: Input should be greater than 0"),
        (["tasks.gc.global_batch_size=3"], "tasks.gc.global_batch_size=3 must be a multiple of train.micro_batch_size=2"),
        (["tasks.bad name.kind=seq-cls", f"tasks.bad name.train={task_files / 'gc_train.csv'}"],
         "tasks: task name 'bad name' must be letters, digits, '_' or '-'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig.load(base[1], [str(x) for x in base[2:]] + extra)
    # the batch split is checked for the world size, as for the LM's batch (--dry-run runs the same checks)
    rc, _, err = run_cli("train", "--dry-run", "--world-size", "2", *base, "tasks.gc.global_batch_size=2")
    assert rc == 2 and err.strip().count("\n") == 0
    assert "tasks.gc.global_batch_size=2 must be a multiple of train.micro_batch_size x dp = 2 x 2 = 4" in err
    # task files are read before any process starts
    rc, _, err = run_cli("train", *base, f"tasks.gc.train={tmp_path / 'missing.csv'}")
    assert rc == 2 and err.strip().count("\n") == 0 and "tasks.gc:" in err and "missing.csv: no such file" in err
    # a checkpoint resumes only with its own tasks
    proc = train(packs, single, 1, *task_overrides(task_files)[:5], "train.steps=5", launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written with tasks ['coding', 'gc'], this run has ['gc']" in proc.stderr


def test_example_config_loads():
    from launch.training.config import TrainConfig

    cfg = TrainConfig.load(REPO / "configs" / "tiny_cotrain.yaml")
    assert {t.kind for t in cfg.tasks.values()} == {"seq-cls", "token-cls", "regression"}
    cfg.layout_for(2)  # its task batches split over 2 data-parallel ranks


def test_token_merging_model_cotrains_under_context_parallel_with_the_same_losses(packs, task_files, tmp_path):
    # The heads read the U-shape's byte decoder output; the patcher's loss terms stay the LM's.
    merging = ["model.patching=learned", "model.patch_size=4", "model.pattern=SDH*", "train.steps=2"]
    single, cp2 = tmp_path / "single", tmp_path / "cp2"
    train(packs, single, 1, *merging, *task_overrides(task_files), launcher="python")
    train(packs, cp2, 2, *merging, *task_overrides(task_files), "parallel.cp=2")
    a, b = ([r for r in metrics(run) if "loss" in r] for run in (cp2, single))
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "lm_loss", "task/gc/loss", "task/coding/loss"):
        assert_close([r[key] for r in a], [r[key] for r in b])
    assert_same_training(cp2, single)  # + gradient norms and final weights
    rc, _, stderr = run_cli("convert", cp2 / "ckpt", tmp_path / "model")
    assert rc == 0, stderr
    rc, stdout, stderr = run_cli("predict", "--model", tmp_path / "model" / "tasks", "--task", "gc", "--input",
                                 task_files / "gc_val.csv")
    assert rc == 0 and stdout.splitlines()[-1].startswith("metrics: accuracy"), stderr
