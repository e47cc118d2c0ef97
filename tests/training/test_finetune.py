"""Task heads, multi-task, metrics, and the finetune/predict commands."""

import gzip

import numpy as np
import pytest
import torch
from support.training import (
    GRAD_NORM_REL,
    WEIGHT_ATOL,
    assert_close,
    weight_differences,
)

from hyena_glt import (
    HyenaGLTConfig,
    HyenaGLTForCausalLM,
    HyenaGLTForSequenceClassification,
    HyenaGLTForSequenceRegression,
    HyenaGLTForTokenClassification,
    HyenaGLTMultiTask,
    MultiTaskMetrics,
    TaskSampler,
    TaskSpec,
)
from hyena_glt.task_metrics import classification_metrics, regression_metrics

torch.set_num_threads(2)


def tiny(**kw) -> HyenaGLTConfig:
    return HyenaGLTConfig(**{**dict(pattern="SS", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=512), **kw})


def read_genome(path) -> bytes:
    with gzip.open(path, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">")).upper().encode()


def windows(genome: bytes, n: int, width: int, lo: int, hi: int, rng) -> np.ndarray:
    starts = rng.integers(lo, hi - width, n)
    return np.stack([np.frombuffer(genome[s : s + width], dtype=np.uint8) for s in starts])


def real_vs_shuffled(genome: bytes, n: int, width: int, lo: int, hi: int, seed: int):
    """Genome windows (label 0) vs windows with their bases shuffled (label 1): same composition,
    only the order (k-mer statistics, codon periodicity) tells them apart."""
    rng = np.random.default_rng(seed)
    real = windows(genome, n, width, lo, hi, rng)
    shuffled = np.stack([rng.permutation(w) for w in windows(genome, n, width, lo, hi, rng)])
    x = np.concatenate([real, shuffled]).astype(np.int64) + 4
    x = np.concatenate([np.ones((2 * n, 1), dtype=np.int64), x], axis=1)  # BOS
    y = np.repeat([0, 1], n)
    order = rng.permutation(2 * n)
    return torch.from_numpy(x[order]), torch.from_numpy(y[order])


def test_sequence_classifier_learns_real_vs_shuffled_ecoli(ecoli, tmp_path):
    genome = read_genome(ecoli)
    # Train on the first 3 Mbp, validate on the last 1 Mbp.
    xtr, ytr = real_vs_shuffled(genome, 1024, 200, 0, 3_000_000, seed=0)
    xva, yva = real_vs_shuffled(genome, 256, 200, 3_600_000, len(genome), seed=1)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")  # the "pretrained" model
    model = HyenaGLTForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(90):
        i = torch.randint(0, len(xtr), (32,), generator=g)
        model(xtr[i], labels=ytr[i]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        m = classification_metrics(model(xva).logits.argmax(-1), yva, 2)
    assert m["accuracy"] > 0.7 and m["mcc"] > 0.4, m  # chance: 0.5 / 0.0


def test_from_pretrained_takes_the_backbone_and_drops_the_lm_head(tmp_path):
    lm = HyenaGLTForCausalLM(tiny(tie_embeddings=False, seed=5))
    lm.save_pretrained(tmp_path / "lm")
    clf = HyenaGLTForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(clf.model.state_dict()[k], v), k
    assert "lm_head.weight" not in clf.state_dict() and clf.head.out.weight.shape == (3, 32)
    fresh = HyenaGLTForSequenceClassification(tiny(tie_embeddings=False, seed=5), num_labels=3)
    assert torch.equal(fresh.head.out.weight, clf.head.out.weight)  # head drawn from the config seed
    # A fine-tuned head round-trips exactly, and refuses a different task.
    clf.save_pretrained(tmp_path / "clf")
    back = HyenaGLTForSequenceClassification.from_pretrained(tmp_path / "clf")
    ids = torch.randint(4, 260, (2, 30))
    clf.eval(), back.eval()
    assert torch.equal(clf(ids).logits, back(ids).logits)
    with pytest.raises(ValueError, match="seq-cls"):
        HyenaGLTForSequenceRegression.from_pretrained(tmp_path / "clf")
    with pytest.raises(FileNotFoundError):
        HyenaGLTForSequenceClassification.from_pretrained(tmp_path / "nothing")


def test_token_classification_and_regression_learn_simple_real_targets(lambda_phage):
    genome = read_genome(lambda_phage)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(windows(genome, 64, 64, 0, len(genome), rng).astype(np.int64) + 4)
    # token-cls: is this base G or C (needs the byte itself, at the causal position that read it)
    tok_labels = ((x == ord("G") + 4) | (x == ord("C") + 4)).long()
    tok = HyenaGLTForTokenClassification(tiny(), num_labels=2, dropout=0.0)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-2)
    for _ in range(40):
        out = tok(x, labels=tok_labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.logits.shape == (64, 64, 2)
    assert classification_metrics(out.logits.argmax(-1), tok_labels)["accuracy"] > 0.9
    # regression: GC fraction of the window
    gc = tok_labels.float().mean(1, keepdim=True)
    reg = HyenaGLTForSequenceRegression(tiny(), num_labels=1, dropout=0.0)
    opt = torch.optim.AdamW(reg.parameters(), lr=1e-2)
    target = (gc - gc.mean()) / gc.std()
    for _ in range(60):
        out = reg(x, labels=target)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert regression_metrics(out.logits, target)["pearson"] > 0.6


def test_heads_on_the_u_shaped_backbone():
    cfg = tiny(pattern="SD", patching="static", patch_size=3, medium_filter_len=32)
    clf = HyenaGLTForSequenceClassification(cfg, num_labels=2)
    ids = torch.randint(4, 260, (3, 40))
    out = clf(ids, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert out.logits.shape == (3, 2) and clf.model.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0


def test_masked_mean_ignores_padding():
    clf = HyenaGLTForSequenceClassification(tiny(), num_labels=2).eval()
    ids = torch.randint(4, 260, (1, 20))
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(clf(ids).logits, clf(padded).logits)


def test_metrics_match_hand_computed_values():
    y = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    p = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])
    m = classification_metrics(p, y, 2)
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert m["accuracy"] == 0.75 and abs(m["mcc"] - mcc) < 1e-12 and abs(m["f1"] - 0.75) < 1e-12
    r = regression_metrics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert abs(r["pearson"] - 1.0) < 1e-12 and abs(r["mse"] - 14 / 3) < 1e-12


def test_multitask_shared_backbone_sampler_and_metrics():
    tasks = {"promoter": TaskSpec("seq-cls", 2, weight=3.0), "gc": TaskSpec("regression", 1, weight=1.0),
             "coding": TaskSpec("token-cls", 3, weight=1.0)}
    model = HyenaGLTMultiTask(tiny(), tasks)
    sampler = TaskSampler({n: t.weight for n, t in tasks.items()}, seed=1)
    draws = [sampler.sample(s) for s in range(400)]
    assert draws == [TaskSampler({n: t.weight for n, t in tasks.items()}, seed=1).sample(s) for s in range(400)]
    assert 0.5 < draws.count("promoter") / 400 < 0.7  # weight 3/5
    ids = torch.randint(4, 260, (2, 16))
    labels = {"promoter": torch.tensor([0, 1]), "gc": torch.randn(2, 1), "coding": torch.randint(0, 3, (2, 16))}
    metrics = MultiTaskMetrics(tasks)
    for name in tasks:
        out = model(ids, task=name, labels=labels[name])
        out.loss.backward()
        metrics.update(name, out.logits, labels[name], out.loss_sum, out.weight_sum)
    assert model.model.embed.weight.grad is not None
    assert all(model.heads[n].out.weight.grad is not None for n in tasks)
    res = metrics.compute()
    assert set(res) == set(tasks) and "mcc" in res["promoter"] and "pearson" in res["gc"] and "loss" in res["coding"]
    with pytest.raises(ValueError, match="task"):
        model(ids, task="nope")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("ranking")


def _write_files(genome: bytes, d, n=24):
    x, y = real_vs_shuffled(genome, n, 60, 0, len(genome), seed=3)
    seqs = [bytes((x[i, 1:] - 4).tolist()).decode() for i in range(len(x))]
    labels = ["real" if v == 0 else "shuffled" for v in y.tolist()]
    (d / "train.csv").write_text("id,sequence,label\n" + "".join(f"r{i},{s},{lab}\n" for i, (s, lab) in enumerate(zip(seqs, labels))))
    (d / "val.fa").write_text("".join(f">v{i} label={lab}\n{s[:30]}\n{s[30:]}\n" for i, (s, lab) in enumerate(zip(seqs[:10], labels[:10]))))
    (d / "reg.tsv").write_text("sequence\tlabel\n" + "".join(f"{s}\t{s.count('G') / len(s)}\n" for s in seqs))
    (d / "tok.tsv").write_text("".join(f"{s}\t{''.join('1' if c in 'GC' else '0' for c in s)}\n" for s in seqs))


def test_finetune_and_predict_commands(lambda_phage, tmp_path, capsys):
    from launch.cli import main

    _write_files(read_genome(lambda_phage), tmp_path)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--task", "seq-cls", "--train", str(tmp_path / "train.csv"),
               "--val", str(tmp_path / "val.fa"), "--out", str(tmp_path / "ft"), "--epochs", "2", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "accuracy" in out and "mcc" in out and "f1" in out
    assert (tmp_path / "ft" / "head.json").is_file()
    rc = main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "val.fa")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "id\tlabel\tp_real\tp_shuffled" and out[1].startswith("v0\t")
    assert out[1].split("\t")[1] in ("real", "shuffled") and out[-1].startswith("metrics: accuracy")  # labelled input
    rc = main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "val.fa"),
               "--output", str(tmp_path / "v.tsv")])
    captured = capsys.readouterr()  # --output: stdout quiet, one summary line (with the metrics) on stderr
    assert rc == 0 and captured.out == "" and len(captured.err.splitlines()) == 1 and "metrics: accuracy" in captured.err
    assert (tmp_path / "v.tsv").read_text().splitlines() == out[:-1]
    rc = main(["predict", "--model", str(tmp_path / "ft"), "--sequence", "ACGTACGT", "--output", str(tmp_path / "p.tsv")])
    captured = capsys.readouterr()
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert rc == 0 and captured.out == "" and len(lines) == 2 and lines[1].startswith("seq1\t")
    for task, file in (("regression", "reg.tsv"), ("token-cls", "tok.tsv")):
        rc = main(["finetune", "--model", str(tmp_path / "lm"), "--task", task, "--train", str(tmp_path / file),
                   "--val", str(tmp_path / file), "--out", str(tmp_path / task), "--max-steps", "2", "--epochs", "1"])
        out = capsys.readouterr().out
        assert rc == 0 and (("mse" in out and "pearson" in out) if task == "regression" else "mcc" in out)
    rc = main(["predict", "--model", str(tmp_path / "token-cls"), "--sequence", "ACGGT"])
    out = capsys.readouterr().out.splitlines()
    line = out[1].split("\t")
    assert rc == 0 and out[0] == "id\tlabels" and len(line[1]) == 5 and set(line[1]) <= {"0", "1"}
    rc = main(["predict", "--model", str(tmp_path / "regression"), "--sequence", "ACGGT"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "id\tprediction" and len(out[1].split("\t")) == 2


def test_finetune_bad_input_is_one_line_error(tmp_path, capsys):
    from launch.cli import main

    (tmp_path / "bad.csv").write_text("sequence,label\nACGT,1\nAC GT!,0\n")
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--task", "seq-cls", "--train", str(tmp_path / "bad.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bad.csv:3" in err and len(err.splitlines()) == 1
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--task", "seq-cls", "--train", str(tmp_path / "missing.csv")])
    assert rc == 2 and "missing.csv" in capsys.readouterr().err


def _write_multitask(genome: bytes, d, n: int, width: int = 100):
    """Three tasks from lambda windows: GC-rich vs AT-rich (seq-cls), GC fraction (regression),
    and G/C at every base (token-cls); train on the first 36 kbp, validate on the rest."""
    rng = np.random.default_rng(0)
    for split, lo, hi, count in (("train", 0, 36_000, n), ("val", 38_000, len(genome), n // 4)):
        seqs = [w.tobytes().decode() for w in windows(genome, count, width, lo, hi, rng)]
        gc = [(s.count("G") + s.count("C")) / width for s in seqs]
        cut = float(np.median(gc))
        (d / f"rich_{split}.csv").write_text("sequence,label\n" + "".join(
            f"{s},{'gc-rich' if g > cut else 'at-rich'}\n" for s, g in zip(seqs, gc)))
        (d / f"gc_{split}.tsv").write_text("".join(f"{s}\t{g:.4f}\n" for s, g in zip(seqs, gc)))
        (d / f"tok_{split}.tsv").write_text("".join(f"{s}\t{''.join('1' if c in 'GC' else '0' for c in s)}\n" for s in seqs))
    (d / "tasks.yaml").write_text(
        "tasks:\n"
        "  rich: {kind: seq-cls, train: rich_train.csv, val: rich_val.csv, weight: 2}\n"
        "  gc: {kind: regression, train: gc_train.tsv, val: gc_val.tsv}\n"
        "  basewise: {kind: token-cls, train: tok_train.tsv, val: tok_val.tsv}\n")


def test_multitask_finetune_command_learns_every_task_with_weighted_sampling(lambda_phage, tmp_path, capsys):
    import json

    from launch.cli import main

    _write_multitask(read_genome(lambda_phage), tmp_path, n=256)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--tasks", str(tmp_path / "tasks.yaml"),
               "--out", str(tmp_path / "mt"), "--epochs", "2", "--batch-size", "16", "--lr", "3e-3"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 tasks on one backbone" in out, out
    history = json.loads((tmp_path / "mt" / "finetune_metrics.json").read_text())
    final = history[-1]["tasks"]
    # Above chance on every task (chance: accuracy 0.5 / Pearson 0 / per-base accuracy ~0.5).
    assert final["rich"]["val"]["accuracy"] > 0.7, final
    assert final["gc"]["val"]["pearson"] > 0.5, final
    assert final["basewise"]["val"]["accuracy"] > 0.8, final
    steps = {n: sum(r["tasks"][n].get("train_steps", 0) for r in history) for n in final}
    total = sum(steps.values())
    assert total == history[-1]["step"] and 0.4 < steps["rich"] / total < 0.6, steps  # weight 2 of 4
    rc = main(["predict", "--model", str(tmp_path / "mt"), "--task", "rich", "--input", str(tmp_path / "rich_val.csv")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0] == "id\tlabel\tp_at-rich\tp_gc-rich" and lines[1].split("\t")[1] in ("gc-rich", "at-rich")
    assert lines[-1].startswith("metrics: accuracy")
    rc = main(["predict", "--model", str(tmp_path / "mt"), "--sequence", "ACGT"])
    assert rc == 2 and "name one of ['basewise', 'gc', 'rich']" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("tasks: {x: {kind: ranking, train: a.csv}}\n")
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--tasks", str(tmp_path / "bad.yaml")])
    assert rc == 2 and "tasks.x.kind" in capsys.readouterr().err


def _history(d) -> list:
    import json

    return json.loads((d / "finetune_metrics.json").read_text())


def _step_losses(history: list) -> list[float]:
    return [x for r in history for t in r["tasks"].values() for x in t.get("step_losses", [])]


def _step_grad_norms(history: list) -> list[float]:
    return [x for r in history for t in r["tasks"].values() for x in t.get("step_grad_norms", [])]


@pytest.mark.distributed
def test_multitask_finetune_under_data_parallel_equals_one_process(lambda_phage, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import free_port

    _write_multitask(read_genome(lambda_phage), tmp_path, n=64)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    common = ["finetune", "--model", str(tmp_path / "lm"), "--tasks", str(tmp_path / "tasks.yaml"), "--epochs", "2",
              "--batch-size", "8", "--lr", "3e-3", "--dropout", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = {"one": [sys.executable, "-m", "launch.cli"],
            "dp2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "launch.cli"]}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, *common, "--out", str(tmp_path / name)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    one, dp2 = _history(tmp_path / "one"), _history(tmp_path / "dp2")
    a, b = _step_losses(one), _step_losses(dp2)
    assert len(a) == len(b) == one[-1]["step"]
    # Same global batches, loss = global sum / global count, gradients summed: equal up to
    # summation order (tolerance 1e-5 relative per step). AdamW hides a wrong gradient scale
    # from the losses: the per-step gradient norms and the final weights are compared too.
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert_close(_step_grad_norms(dp2), _step_grad_norms(one), GRAD_NORM_REL)
    from safetensors.torch import load_file

    diffs = weight_differences(load_file(tmp_path / "dp2" / "model.safetensors"),
                               load_file(tmp_path / "one" / "model.safetensors"))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WEIGHT_ATOL, (worst, diffs[worst])
    assert abs(one[-1]["tasks"]["gc"]["val"]["pearson"] - dp2[-1]["tasks"]["gc"]["val"]["pearson"]) < 1e-4


def test_finetune_resumes_where_it_stopped_with_the_same_steps(lambda_phage, tmp_path, capsys):
    from safetensors.torch import load_file

    from launch.cli import main

    _write_multitask(read_genome(lambda_phage), tmp_path, n=64)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    common = ["finetune", "--model", str(tmp_path / "lm"), "--tasks", str(tmp_path / "tasks.yaml"), "--epochs", "2",
              "--batch-size", "8", "--lr", "3e-3"]  # dropout on: the RNG state is part of the checkpoint
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--exit-after-steps", "11"]) == 0  # mid-epoch
    assert "continue with --resume" in capsys.readouterr().out
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    assert "at step 11" in capsys.readouterr().out
    assert _step_losses(_history(tmp_path / "split")) == _step_losses(_history(tmp_path / "straight"))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A resume with other settings is refused, naming what changed.
    rc = main([*common[:-2], "--lr", "1e-3", "--out", str(tmp_path / "split"), "--resume"])
    assert rc == 2 and "lr" in capsys.readouterr().err


def test_finetune_step_leaves_the_other_tasks_heads_untouched(lambda_phage, tmp_path):
    from types import SimpleNamespace

    from launch.finetune.data import prepare_task
    from launch.finetune.trainer import FinetuneJob, Finetuner, start_data_parallel
    from megatron_adapters.groups import destroy_parallel

    _write_multitask(read_genome(lambda_phage), tmp_path, n=16)
    data = {"gc": prepare_task("regression", str(tmp_path / "gc_train.tsv"), None, 128),
            "rich": prepare_task("seq-cls", str(tmp_path / "rich_train.csv"), None, 128)}
    tasks = {n: TaskSpec(d.kind, d.num_labels) for n, d in data.items()}
    model = HyenaGLTMultiTask(tiny(), tasks)
    args = SimpleNamespace(batch_size=8, lr=1e-3, weight_decay=0.1, epochs=1, max_steps=0, seed=0, out=str(tmp_path))
    ctx = start_data_parallel(model.config)
    try:
        trainer = Finetuner(FinetuneJob(model, tasks, data, multi=True), args, ctx)
        before = {n: p.detach().clone() for n, p in model.heads["rich"].named_parameters()}
        trainer.train_step("gc")
        trainer.train_step("gc")
    finally:
        destroy_parallel()
    assert all(torch.equal(p, before[n]) for n, p in model.heads["rich"].named_parameters())  # no decay, no momentum
    assert not torch.equal(model.heads["gc"].out.weight, HyenaGLTMultiTask(tiny(), tasks).heads["gc"].out.weight)


def test_a_new_task_kind_is_one_registry_entry(lambda_phage, tmp_path, monkeypatch, capsys):
    """A kind registered in TASK_KINDS (here: seq-cls under another name, with its own output
    header) is fine-tuned, checkpointed and predicted by the commands with nothing else added."""
    from dataclasses import replace

    from hyena_glt.heads import TASK_KINDS
    from launch.cli import main

    monkeypatch.setitem(TASK_KINDS, "seq-cls-2", replace(TASK_KINDS["seq-cls"], name="seq-cls-2",
                                                         output_header="class\tscores"))
    _write_files(read_genome(lambda_phage), tmp_path, n=8)
    HyenaGLTForCausalLM(tiny()).save_pretrained(tmp_path / "lm")
    rc = main(["finetune", "--model", str(tmp_path / "lm"), "--task", "seq-cls-2", "--train", str(tmp_path / "train.csv"),
               "--val", str(tmp_path / "val.fa"), "--out", str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "8"])
    assert rc == 0 and "mcc" in capsys.readouterr().out
    rc = main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "val.fa")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "id\tclass\tscores_real\tscores_shuffled" and out[1].split("\t")[1] in ("real", "shuffled")
    assert out[-1].startswith("metrics: accuracy")
