"""Options no other test passed, each checked for its effect, not only accepted:

    train.min_lr_ratio   the logged lr follows warmup + cosine down to lr * ratio at the last step
    train.betas          Adam's moments after one step are (1 - b1) g and (1 - b2) g^2
    train.tensorboard    every scalar of metrics.jsonl reaches a SummaryWriter on out_dir/tensorboard
                         (a stand-in writer: tensorboard is not installed by `make env`), and
                         without tensorboard the run says so and keeps metrics.jsonl
    eval --split         scores exactly the windows of that split of a pack
    convert --tolerance  decides --verify's OK / FAILED and the exit status
    export-vortex --model-name   the model_name of the written Vortex config
    generate             the CLI writes what hyena_glt's generate gives for the same seed;
                         --recompute runs without the inference cache (and gives the cached tokens);
                         --stop-at-eos lets the model end a sample with EOS

Everything runs in this process (run_cli) on one tiny training run (configs/tiny.yaml, 4 steps on
the session's packs) and the model converted from it.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import genome_path, run_cli

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
STEPS = 4
LR = 0.003  # configs/tiny.yaml
MIN_LR_RATIO = 0.5  # the default is 0.1
BETAS = (0.8, 0.9)  # the default is (0.9, 0.95)



def train_args(packs: Path, out: Path, *overrides: str) -> list:
    return ["train", "--config", CONFIG, f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_batches=2", f"data.train={packs / 'train'}",
            f"data.val={packs / 'val'}", f"out_dir={out}", f"checkpoint.dir={out / 'ckpt'}", *overrides]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


class _Writer:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""

    made: list["_Writer"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = Path(log_dir), [], False
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def run(tiny_packs, tmp_path_factory) -> Path:
    """The tiny config, 4 steps, with train.min_lr_ratio, train.betas and train.tensorboard set,
    a checkpoint after every step."""
    out = tmp_path_factory.mktemp("options") / "run"
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = _Writer
    _Writer.made.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch.utils.tensorboard", board)
        rc, stdout, err = run_cli(*train_args(tiny_packs, out, f"train.min_lr_ratio={MIN_LR_RATIO}",
                                              f"train.betas=[{BETAS[0]}, {BETAS[1]}]", "train.tensorboard=true",
                                              "checkpoint.every=1", f"checkpoint.keep={STEPS}"))
    assert rc == 0, (stdout + err)[-4000:]
    return out


@pytest.fixture(scope="module")
def model(run) -> Path:
    """The run's last checkpoint, converted."""
    rc, stdout, err = run_cli("convert", run / "ckpt", run.parent / "model")
    assert rc == 0, err
    return run.parent / "model"


# ---------------------------------------------------------------------------- train options


def test_min_lr_ratio_is_the_last_steps_share_of_the_lr(run):
    lrs = [r["lr"] for r in metrics(run) if "loss" in r]
    # warmup_steps=1: step 1 at the full lr, then a cosine over steps 1..4 down to lr * min_lr_ratio
    by_hand = [LR] + [LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * (s - 1) / (STEPS - 1))))
                      for s in range(2, STEPS + 1)]
    assert lrs == pytest.approx(by_hand, rel=1e-12)
    assert lrs[-1] == pytest.approx(LR * MIN_LR_RATIO, rel=1e-12)


def test_betas_reach_the_optimizer(run):
    """After AdamW's first step from zero moments: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2,
    so sum(exp_avg^2) / sum(exp_avg_sq) = (1 - b1)^2 / (1 - b2) whatever the gradient."""
    from launch.checkpoint import read_tensors

    step1 = run / "ckpt" / "step_00000001"
    assert json.loads((step1 / "meta.json").read_text())["step"] == 1
    optim = read_tensors(step1 / "optim-tp00-pp00.safetensors")
    m2 = sum(float(t.double().square().sum()) for k, t in optim.items() if k.startswith("exp_avg/"))
    v = sum(float(t.double().sum()) for k, t in optim.items() if k.startswith("exp_avg_sq/"))
    assert v > 0
    assert m2 / v == pytest.approx((1 - BETAS[0]) ** 2 / (1 - BETAS[1]), rel=1e-4)  # the defaults give 0.2, not 0.4


def test_tensorboard_gets_every_logged_scalar(run):
    (writer,) = _Writer.made
    assert writer.log_dir == run / "tensorboard" and writer.closed
    logged = [(k, v, r["step"]) for r in metrics(run) for k, v in r.items()
              if k != "step" and isinstance(v, (int, float))]
    assert writer.scalars == logged
    assert {tag for tag, _, _ in logged} >= {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "val_loss"}


def test_tensorboard_not_installed_keeps_metrics_jsonl(tiny_packs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    rc, _, err = run_cli(*train_args(tiny_packs, tmp_path, "train.steps=1", "train.eval_batches=0",
                                     "train.tensorboard=true", "checkpoint.dir=null"))
    assert rc == 0, err[-3000:]
    assert "tensorboard is not installed; metrics go to metrics.jsonl only" in err
    assert [r["step"] for r in metrics(tmp_path)] == [1] and not (tmp_path / "tensorboard").exists()


# ---------------------------------------------------------------------------- eval --split


def test_eval_split_scores_that_split(model, tmp_path):
    from data_tools.fasta import check_file, read_records

    path = genome_path("lambda_phage.fasta.gz")
    seq = next(read_records(path, lambda: check_file(path))).seq
    # 20 records: pack assigns whole records to splits
    records = [b">r%d\n%s\n" % (i, seq[i * 2400 : (i + 1) * 2400]) for i in range(20)]
    (tmp_path / "multi.fa").write_bytes(b"".join(records))
    rc, _, err = run_cli("pack", tmp_path / "multi.fa", "--out", tmp_path / "pack", "--seq-len", "128",
                         "--val-fraction", "0.3", "--test-fraction", "0.2", "--progress", "none")
    assert rc == 0, err
    totals = json.loads((tmp_path / "pack" / "manifest.json").read_text())["totals"]
    assert set(totals) == {"train", "val", "test"}
    results = {}
    for split in ("train", "val", "test"):
        rc, stdout, err = run_cli("eval", "--model", model, "--data", tmp_path / "pack", "--split", split)
        assert rc == 0, err
        results[split] = json.loads(stdout.strip().splitlines()[-1])
        assert results[split]["bases"] == totals[split]["bases"], (split, results[split], totals)
    assert len({r["loss"] for r in results.values()}) == 3  # three different sets of windows
    rc, stdout, _ = run_cli("eval", "--model", model, "--data", tmp_path / "pack")  # the default: val
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1]) == results["val"]
    rc, _, err = run_cli("eval", "--model", model, "--data", tmp_path / "pack", "--split", "nope")
    assert rc == 2 and "no windows in split 'nope'" in err


# ---------------------------------------------------------------------------- convert --tolerance


def test_convert_tolerance_decides_the_verify_outcome(run, tmp_path, monkeypatch):
    """--verify's probe (the sharded model under torchrun, run for real by tests/training/test_train.py
    and the demo) is replaced by a known logit difference; --tolerance alone decides the outcome."""
    from launch.checkpoint import convert

    monkeypatch.setattr(convert, "_verify", lambda path, out_dir, meta: 2.5e-5)
    for tolerance, rc_expected, verdict in (("1e-5", 1, "FAILED, tolerance 1e-05"), ("5e-5", 0, "OK, tolerance 5e-05"),
                                            (None, 0, "OK, tolerance 0.0001")):
        option = ["--tolerance", tolerance] if tolerance else []
        rc, stdout, err = run_cli("convert", run / "ckpt", tmp_path / f"m{tolerance}", "--verify", *option)
        assert rc == rc_expected, stdout + err
        assert f"max |logit difference| single-device vs sharded = 2.500e-05 ({verdict})" in stdout


# ---------------------------------------------------------------------------- export-vortex --model-name


def test_export_vortex_model_name(tmp_path):
    from support.evo2_oracle import tiny_config

    from hyena_glt import HyenaGLTForCausalLM
    from launch.interop.evo2 import config_from_evo2

    HyenaGLTForCausalLM(config_from_evo2(tiny_config("evo2-7b-8k"))).save_pretrained(tmp_path / "evo-like")
    rc, _, err = run_cli("export-vortex", tmp_path / "evo-like", tmp_path / "named.pt", "--model-name", "my-evo")
    assert rc == 0, err
    rc, _, err = run_cli("export-vortex", tmp_path / "evo-like", tmp_path / "default.pt")
    assert rc == 0, err
    named, default = (yaml.safe_load((tmp_path / f"{n}.yml").read_text()) for n in ("named", "default"))
    assert named["model_name"] == "my-evo" and default["model_name"] == "evo-like"  # default: the directory's name
    assert {**named, "model_name": None} == {**default, "model_name": None}  # nothing else changes


# ---------------------------------------------------------------------------- generate


PROMPTS = ["ACGTTGCAAC", "GATTACA"]


def fasta(texts: list[str], names: list[str], prompts: list[str], seed: int) -> str:
    """What `generate --out` writes: one record per sample, 80 columns."""
    out = []
    for name, prompt, text in zip(names, prompts, texts):
        out.append(f">{name}_sample1 seed={seed} new_tokens={len(text) - len(prompt)}\n")
        out += [text[i : i + 80] + "\n" for i in range(0, len(text), 80)]
    return "".join(out)


def generated(model: Path, max_new: int, seed: int, **sampling) -> list[str]:
    """hyena_glt's generate on PROMPTS, decoded as the CLI decodes."""
    from hyena_glt import ByteTokenizer, load_causal_lm

    lm, tok = load_causal_lm(model).eval(), ByteTokenizer()
    ids = [tok.encode(p.encode(), add_bos=lm.config.bos_token).ids for p in PROMPTS]
    return [tok.decode(x).decode("ascii", errors="replace") for x in lm.generate(ids, max_new, seed=seed, **sampling)]


def generate_cli(model: Path, out: Path, *options) -> str:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    rc, stdout, err = run_cli("generate", "--model", model, *prompts, "--out", out, *options)
    assert rc == 0, err
    assert stdout.strip() == f"wrote {len(PROMPTS)} sample(s) to {out}"
    return out.read_text()


def test_generate_cli_writes_what_generate_gives(model, tmp_path):
    text = generate_cli(model, tmp_path / "s.fa", "--seed", "7", "--max-new-tokens", "100", "--temperature", "0.8",
                        "--top-k", "3", "--top-p", "0.9")
    want = generated(model, 100, 7, temperature=0.8, top_k=3, top_p=0.9)
    assert [len(t) for t in want] == [len(p) + 100 for p in PROMPTS]
    assert text == fasta(want, ["prompt1", "prompt2"], PROMPTS, 7)
    assert generate_cli(model, tmp_path / "s8.fa", "--seed", "8", "--max-new-tokens", "100", "--temperature", "0.8",
                        "--top-k", "3", "--top-p", "0.9") != text  # the seed is used


@pytest.fixture
def cache_calls(monkeypatch) -> list[str]:
    """The names of the inference-cache methods (prefill, step) called on the plain model."""
    from hyena_glt import HyenaGLTForCausalLM

    calls = []
    for name in ("prefill", "step"):
        real = getattr(HyenaGLTForCausalLM, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(HyenaGLTForCausalLM, name, spy)
    return calls


def test_generate_recompute_runs_without_the_cache(model, tmp_path, cache_calls):
    greedy = ["--seed", "3", "--max-new-tokens", "40", "--temperature", "0"]
    recomputed = generate_cli(model, tmp_path / "r.fa", *greedy, "--recompute")
    assert cache_calls == []
    assert recomputed == fasta(generated(model, 40, 3, temperature=0.0, use_cache=False), ["prompt1", "prompt2"],
                               PROMPTS, 3)
    cached = generate_cli(model, tmp_path / "c.fa", *greedy)
    assert "prefill" in cache_calls and cache_calls.count("step") == 39
    assert cached == recomputed  # greedy: the cache gives the tokens of the full recompute


def test_generate_stop_at_eos_ends_samples(model, tmp_path):
    """A model whose logits are all equal (its final norm zeroed): greedy picks the lowest id allowed:
    EOS with --stop-at-eos (each sample ends at once), else byte 0 (every sample runs to the end)."""
    from hyena_glt import load_causal_lm
    from hyena_glt.tokenizer import EOS_ID

    lm = load_causal_lm(model)
    with torch.no_grad():
        lm.model.final_norm.weight.zero_()
    lm.save_pretrained(tmp_path / "flat")
    options = ["--seed", "0", "--max-new-tokens", "12", "--temperature", "0"]
    stopped = generate_cli(tmp_path / "flat", tmp_path / "stop.fa", *options, "--stop-at-eos")
    assert stopped == fasta(PROMPTS, ["prompt1", "prompt2"], PROMPTS, 0)  # new_tokens=0
    full = generate_cli(tmp_path / "flat", tmp_path / "full.fa", *options)
    assert full == fasta([p + "\x00" * 12 for p in PROMPTS], ["prompt1", "prompt2"], PROMPTS, 0)
    ids = lm.eval().generate([torch.tensor([1, 5, 6])], 12, temperature=0.0, stop_at_eos=True)
    assert ids[0].tolist() == [1, 5, 6, EOS_ID]


def test_generate_warns_past_the_models_max_seq_len(model, tmp_path):
    """Samples longer than the model was trained on still come, with one warning line."""
    import json

    max_len = json.loads((model / "config.json").read_text())["max_seq_len"]
    rc, _, err = run_cli("generate", "--model", model, "--prompt", "ACGT", "--out", tmp_path / "short.fa",
                         "--max-new-tokens", "8")
    assert rc == 0 and "warning" not in err, err
    rc, _, err = run_cli("generate", "--model", model, "--prompt", "ACGT", "--out", tmp_path / "long.fa",
                         "--max-new-tokens", str(max_len), "--temperature", "0")
    assert rc == 0, err
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and f"more than the {max_len:,} of the model's max_seq_len" in warnings[0], err
