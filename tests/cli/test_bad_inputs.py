"""Bad inputs to every command: one row per case (the damage, the command line, the exit
status, what the message must say). Each failure is one line on stderr naming the file or
option (argparse's usage + `error: argument --x` lines for a bad number), exit status 2, and
never a traceback; HYENA_GLT_DEBUG=1 brings the traceback back.

Fixtures are tiny (a 2-layer model, a pack of lambda phage with small shards) and every
command runs in this process (no interpreter start-up per row).

Every bad input either works as documented (README "Data tools" table) or fails with
one line naming the file; --skip-bad-files skips and records it, with exit code 1.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import genome_path, run_cli
from support.data import manifest, pack_samples, read_fasta, write_fasta

from launch.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"


run = run_cli  # `hyena-glt ARGS` in this process: (exit status, stdout, stderr)


def visible_lines(err: str) -> list[str]:
    """The lines a terminal shows: a progress bar redraws itself with '\\r' (and clears
    itself at the end), so only what follows the last '\\r' of a line stays."""
    return [seg.rsplit("\r", 1)[-1] for seg in err.split("\n") if seg.rsplit("\r", 1)[-1].strip()]


# ---------------------------------------------------------------------------- fixtures


@dataclass
class World:
    root: Path
    model: Path  # a causal LM directory
    head: Path  # a fine-tuned regression head directory
    pack: Path  # lambda phage, val split, several shards
    train_pack: Path  # the same, train split (for `train`)
    fasta: Path  # two short records (fast to score / embed)


def tiny_config():
    from hyena_glt import HyenaGLTConfig

    return HyenaGLTConfig(pattern="S*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16,
                          modal_order=4, max_seq_len=256)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from hyena_glt import build_causal_lm
    from hyena_glt.heads import HyenaGLTForSequenceRegression

    root = tmp_path_factory.mktemp("bad_inputs")
    build_causal_lm(tiny_config()).save_pretrained(root / "model")
    HyenaGLTForSequenceRegression(tiny_config(), 1).save_pretrained(root / "head")
    lam = genome_path("lambda_phage.fasta.gz")
    common = ["--seq-len", "128", "--min-len", "1", "--shard-size-mb", "0.01", "--progress", "none"]
    for name, frac in (("pack", "1"), ("train_pack", "0")):
        rc, _, err = run("pack", lam, "--out", root / name, "--val-fraction", frac, *common)
        assert rc == 0, err
    _, seq = read_fasta(lam)[0]
    fasta = write_fasta(root / "short.fa", [("r1", seq[:300]), ("r2", seq[1000:1200])])
    return World(root, root / "model", root / "head", root / "pack", root / "train_pack", fasta)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def zero_bytes(path: Path, start: int, n: int) -> None:
    """Overwrite n bytes in place (same size, as a bad disk sector would)."""
    data = bytearray(path.read_bytes())
    data[start : start + n] = b"\0" * n
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    # (world, tmp_path, monkeypatch) -> (argv, fragments the message must contain)
    setup: Callable[..., tuple[list, list[str]]]
    argparse: bool = False  # a bad number refused by argparse (usage + error line)
    rc: int = 2
    marks: list = field(default_factory=list)


def _bad_yaml(w, tmp, mp, command):
    cfg = tmp / "bad.yaml"
    cfg.write_text("model:\n  pattern: [S*\n  d_model: 32\n")
    argv = ["train", "--config", cfg] if command == "train" else ["info", cfg]
    return argv, [str(cfg), "line 3", "not valid YAML"]


def _yaml_not_utf8(w, tmp, mp):
    cfg = tmp / "latin1.yaml"
    cfg.write_bytes(b"# Modell f\xfcr E. coli\nmodel:\n  pattern: S*\n")
    return ["info", cfg], [str(cfg), "line 1", "not UTF-8", "0xfc"]


def _yaml_list(w, tmp, mp):
    cfg = tmp / "list.yaml"
    cfg.write_text("- model:\n    pattern: S*\n")
    return ["train", "--config", cfg], [str(cfg), "expected a mapping of sections", "got a list"]


def _model_argv(w, tmp, d, command) -> list:
    return {"eval": ["eval", "--model", d, "--data", w.pack],
            "generate": ["generate", "--model", d, "--max-new-tokens", "2"],
            "info": ["info", d],
            "embed": ["embed", "--model", d, "--input", w.fasta, "--out", tmp / "e.npy"],
            "predict": ["predict", "--model", d, "--sequence", "ACGT"]}[command]


def _damaged_safetensors(w, tmp, mp, command, how, verified=True):
    """A damaged weights file. Verified (the default): refused by its checksums.json entry
    before it is parsed; with HYENA_GLT_VERIFY_MODEL=0 (or a directory saved before checksums
    were recorded), by safetensors when read."""
    d = copy_dir(w.model, tmp / "model")
    f = d / "model.safetensors"
    size = f.stat().st_size
    if how == "zeroed":
        zero_bytes(f, 0, 64)  # the header length and the start of the header
    else:
        f.write_bytes(f.read_bytes()[: size // 2])
    if not verified:
        mp.setenv("HYENA_GLT_VERIFY_MODEL", "0")
        return _model_argv(w, tmp, d, command), [str(f), "not a readable safetensors file"]
    why = "damaged: sha256" if how == "zeroed" else f"damaged: {size // 2:,} bytes but checksums.json expects {size:,}"
    return _model_argv(w, tmp, d, command), [f"{f}: {why}", f"info --verify {d}"]


def flip_tensor_bits(path: Path) -> None:
    """One bit flipped inside the tensor data (not the header): the file still parses."""
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x10
    path.write_bytes(bytes(data))


def _flipped_weights(w, tmp, mp, command):
    src = w.head if command == "predict" else w.model
    d = copy_dir(src, tmp / "model")
    f = d / "model.safetensors"
    expected = json.loads((d / "checksums.json").read_text())["files"]["model.safetensors"]["sha256"]
    flip_tensor_bits(f)
    actual = hashlib.sha256(f.read_bytes()).hexdigest()
    return _model_argv(w, tmp, d, command), [f"{f}: damaged: sha256 {actual} but checksums.json expects {expected}"]


def _truncated_config(w, tmp, mp, command, verified=True):
    d = copy_dir(w.model, tmp / "model")
    f = d / "config.json"
    size = f.stat().st_size
    f.write_text(f.read_text()[:60])
    argv = {"eval": ["eval", "--model", d, "--data", w.pack], "info": ["info", d],
            "generate": ["generate", "--model", d, "--max-new-tokens", "2"]}[command]
    if not verified:
        mp.setenv("HYENA_GLT_VERIFY_MODEL", "0")
        return argv, [str(f), "not valid JSON"]
    return argv, [f"{f}: damaged: 60 bytes but checksums.json expects {size:,}"]


def _damaged_checksums(w, tmp, mp):
    d = copy_dir(w.model, tmp / "model")
    f = d / "checksums.json"
    f.write_text(f.read_text()[:50])
    return ["eval", "--model", d, "--data", w.pack], [str(f), "not valid JSON", "HYENA_GLT_VERIFY_MODEL=0"]


def _interrupted_save(w, tmp, mp):
    """save_pretrained over an existing directory that failed on the weights (a full disk): the
    directory keeps the new config, the old weights and checksums.json's placeholder."""
    import hyena_glt.checksums as checksums
    from hyena_glt import build_causal_lm

    d = copy_dir(w.model, tmp / "model")
    real = checksums.save_file
    mp.setattr(checksums, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        build_causal_lm(tiny_config().model_copy(update={"seed": 7})).save_pretrained(d)
    mp.setattr(checksums, "save_file", real)
    return ["eval", "--model", d, "--data", w.pack], [str(d), "the save that wrote this directory did not finish"]


def _missing_recorded_file(w, tmp, mp):
    d = copy_dir(w.head, tmp / "head")
    (d / "head.json").unlink()
    return ["info", d], [f"{d / 'head.json'}: missing, but checksums.json lists it"]


def _damaged_head_json(w, tmp, mp, verified=True):
    d = copy_dir(w.head, tmp / "head")
    meta = json.loads((d / "head.json").read_text())
    del meta["num_labels"]
    (d / "head.json").write_text(json.dumps(meta))
    if verified:
        return ["predict", "--model", d, "--sequence", "ACGT"], [f"{d / 'head.json'}: damaged:", "checksums.json expects"]
    mp.setenv("HYENA_GLT_VERIFY_MODEL", "0")
    return ["predict", "--model", d, "--sequence", "ACGT"], ["missing key 'num_labels'", str(d)]


def _damaged_manifest(w, tmp, mp):
    d = copy_dir(w.pack, tmp / "pack")
    m = json.loads((d / "manifest.json").read_text())
    del m["shards"][1]["sha256"]
    (d / "manifest.json").write_text(json.dumps(m))
    return ["eval", "--model", w.model, "--data", d], [str(d / "manifest.json"), "missing key shards[1].sha256"]


def _truncated_manifest(w, tmp, mp):
    d = copy_dir(w.pack, tmp / "pack")
    (d / "manifest.json").write_text((d / "manifest.json").read_text()[:100])
    return ["data", "stats", d], [str(d / "manifest.json"), "not valid JSON"]


class _FullDisk(io.TextIOWrapper):
    def write(self, s):  # what a write to a full disk raises: an errno, no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_open(path, mode="r", *args, **kwargs):
    if "w" in mode:
        return _FullDisk(open(path, "wb"))
    return open(path, mode, *args, **kwargs)


def _enospc_score(w, tmp, mp):
    import launch.inference.evaluate

    mp.setattr(launch.inference.evaluate, "open", _full_open, raising=False)
    out = tmp / "scores.tsv"
    return ["score", "--model", w.model, "--input", w.fasta, "--out", out], ["No space left on device", "ENOSPC",
                                                                            f"--out {out}"]


def _enospc_embed(w, tmp, mp):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp / "emb.npy"
    os.symlink("/dev/full", out)  # a real ENOSPC on every write
    return ["embed", "--model", w.model, "--input", w.fasta, "--out", out], ["No space left on device", f"--out {out}"]


def _enospc_pack(w, tmp, mp):
    import data_tools.shards

    def full(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(data_tools.shards._HashingFile, "write", full)
    out = tmp / "packed"
    return (["pack", w.fasta, "--out", out, "--seq-len", "100", "--val-fraction", "0", "--progress", "none"],
            [str(out / "train-00000-000000.tar"), "No space left on device (ENOSPC)"])


def _eisdir_generate(w, tmp, mp):
    (tmp / "samples").mkdir()
    return (["generate", "--model", w.model, "--max-new-tokens", "2", "--out", tmp / "samples"],
            [str(tmp / "samples"), "Is a directory"])


def _not_utf8_labels(w, tmp, mp, fmt):
    if fmt == "csv":
        f = tmp / "labels.csv"
        f.write_bytes(b"sequence,label\nACGT,a\nACGA,b\nAC\xe9GT,a\n")
        return ["finetune", "--model", w.model, "--task", "seq-cls", "--train", f, "--out", tmp / "ft"], [
            f"{f}:4", "not UTF-8", "0xe9"]
    if fmt == "tsv":
        f = tmp / "new.tsv"
        f.write_bytes(b"id\tsequence\nx1\tACGT\nx\xff2\tACGG\n")
        return ["predict", "--model", w.head, "--input", f], [f"{f}:3", "not UTF-8", "0xff"]
    f = tmp / "labels.fa"
    f.write_bytes(b">a label=x\nACGT\n>b label=y\nACGT\n>caf\xe9 label=x\nACGT\n")
    return ["finetune", "--model", w.model, "--task", "seq-cls", "--train", f, "--out", tmp / "ft"], [
        f"{f}:5", "not UTF-8"]


def _not_utf8_fasta_id(w, tmp, mp, command):
    f = tmp / "reads.fa"
    f.write_bytes(b">r1\nACGTACGTAC\n>r\xff2 x\nACGTACGTAC\n")
    argv = {"score": ["score", "--model", w.model, "--input", f, "--out", tmp / "s.tsv"],
            "pack": ["pack", f, "--out", tmp / "p", "--seq-len", "4", "--min-len", "1", "--progress", "none"]}[command]
    return argv, [str(f), "line 3", "record id is not UTF-8"]


def _nonfinite_label(w, tmp, mp, value, fmt):
    if fmt == "csv":
        f = tmp / "reg.csv"
        f.write_text(f"sequence,label\nACGTACGT,0.5\nACGGACGT,{value}\nAAAAACGT,0.25\n")
        where = [f"{f}:3", "record seq2"]
    else:
        f = tmp / "reg.fa"
        f.write_text(f">s1 label=0.5\nACGTACGT\n>s2 label=0.1\nACGTAAAA\n>s3 label={value}\nACGGACGT\n")
        where = [f"{f}:5", "record s3"]
    argv = ["finetune", "--model", w.model, "--task", "regression", "--train", f, "--out", tmp / "ft", "--epochs", "1"]
    return argv, [*where, f"regression label {value!r} is not a finite number"]


def _zeroed_shard(w, tmp, mp, command):
    src = w.pack if command == "eval" else w.train_pack
    d = copy_dir(src, tmp / "pack")
    m = json.loads((d / "manifest.json").read_text())
    entry = m["shards"][1]  # not the first: batches from a good shard come out before the bad one is opened
    shard = d / entry["path"]
    zero_bytes(shard, 1536, 200)  # inside the first sample's bases
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    frags = [str(shard), "damaged shard", entry["sha256"], actual, "--verify"]
    if command == "eval":
        return ["eval", "--model", w.model, "--data", d, "--batch-size", "4"], frags
    return (["train", "--config", CONFIG, f"data.train={d}", f"data.val={d}", f"out_dir={tmp / 'run'}",
             f"checkpoint.dir={tmp / 'ckpt'}", "train.steps=3", "train.seq_len=128", "train.global_batch_size=16",
             "train.micro_batch_size=16", "train.warmup_steps=1", "train.eval_batches=0", "model.pattern=S*",
             "model.d_model=32", "model.num_heads=2", "model.num_filter_groups=4", "model.medium_filter_len=16",
             "model.modal_order=4"], frags)


def _arg(*argv):
    """A bad value of the option second to last in argv (placeholders filled from the world)."""
    option = argv[-2]

    def setup(w, tmp, mp):
        fill = {"MODEL": w.model, "HEAD": w.head, "FASTA": w.fasta, "PACK": w.pack, "OUT": tmp / "out"}
        return [fill.get(str(a), a) for a in argv], [f"argument {option}:"]

    return setup


CASES = [
    # malformed YAML configs
    Case("yaml-syntax-train", lambda w, t, m: _bad_yaml(w, t, m, "train")),
    Case("yaml-syntax-info", lambda w, t, m: _bad_yaml(w, t, m, "info")),
    Case("yaml-not-utf8-info", _yaml_not_utf8),
    Case("yaml-top-level-list-train", _yaml_list),
    # damaged model directories
    Case("safetensors-zeroed-eval", lambda w, t, m: _damaged_safetensors(w, t, m, "eval", "zeroed")),
    Case("safetensors-zeroed-generate", lambda w, t, m: _damaged_safetensors(w, t, m, "generate", "zeroed")),
    Case("safetensors-zeroed-info", lambda w, t, m: _damaged_safetensors(w, t, m, "info", "zeroed")),
    Case("safetensors-truncated-eval", lambda w, t, m: _damaged_safetensors(w, t, m, "eval", "truncated")),
    Case("safetensors-truncated-embed", lambda w, t, m: _damaged_safetensors(w, t, m, "embed", "truncated")),
    Case("safetensors-zeroed-eval-unverified",
         lambda w, t, m: _damaged_safetensors(w, t, m, "eval", "zeroed", verified=False)),
    Case("safetensors-truncated-info-unverified",
         lambda w, t, m: _damaged_safetensors(w, t, m, "info", "truncated", verified=False)),
    Case("safetensors-flipped-bit-eval", lambda w, t, m: _flipped_weights(w, t, m, "eval")),
    Case("safetensors-flipped-bit-info", lambda w, t, m: _flipped_weights(w, t, m, "info")),
    Case("safetensors-flipped-bit-generate", lambda w, t, m: _flipped_weights(w, t, m, "generate")),
    Case("safetensors-flipped-bit-embed", lambda w, t, m: _flipped_weights(w, t, m, "embed")),
    Case("safetensors-flipped-bit-predict", lambda w, t, m: _flipped_weights(w, t, m, "predict")),
    Case("checksums-json-truncated-eval", _damaged_checksums),
    Case("recorded-file-missing-info", _missing_recorded_file),
    Case("interrupted-save-eval", _interrupted_save),
    Case("config-json-truncated-eval", lambda w, t, m: _truncated_config(w, t, m, "eval")),
    Case("config-json-truncated-info", lambda w, t, m: _truncated_config(w, t, m, "info")),
    Case("config-json-truncated-generate", lambda w, t, m: _truncated_config(w, t, m, "generate")),
    Case("config-json-truncated-generate-unverified",
         lambda w, t, m: _truncated_config(w, t, m, "generate", verified=False)),
    Case("head-json-missing-key-predict", _damaged_head_json),
    Case("head-json-missing-key-predict-unverified", lambda w, t, m: _damaged_head_json(w, t, m, verified=False)),
    # damaged packs
    Case("manifest-missing-key-eval", _damaged_manifest),
    Case("manifest-truncated-stats", _truncated_manifest),
    Case("shard-zeroed-eval", lambda w, t, m: _zeroed_shard(w, t, m, "eval")),
    Case("shard-zeroed-train", lambda w, t, m: _zeroed_shard(w, t, m, "train")),
    # the disk
    Case("enospc-score", _enospc_score),
    Case("enospc-embed", _enospc_embed),
    Case("enospc-pack", _enospc_pack),
    Case("eisdir-generate", _eisdir_generate),
    # text that is not UTF-8
    Case("not-utf8-csv-finetune", lambda w, t, m: _not_utf8_labels(w, t, m, "csv")),
    Case("not-utf8-tsv-predict", lambda w, t, m: _not_utf8_labels(w, t, m, "tsv")),
    Case("not-utf8-fasta-header-finetune", lambda w, t, m: _not_utf8_labels(w, t, m, "fasta")),
    Case("not-utf8-fasta-id-score", lambda w, t, m: _not_utf8_fasta_id(w, t, m, "score")),
    Case("not-utf8-fasta-id-pack", lambda w, t, m: _not_utf8_fasta_id(w, t, m, "pack")),
    # non-finite regression labels
    Case("label-nan-csv", lambda w, t, m: _nonfinite_label(w, t, m, "nan", "csv")),
    Case("label-inf-csv", lambda w, t, m: _nonfinite_label(w, t, m, "inf", "csv")),
    Case("label-minus-inf-fasta", lambda w, t, m: _nonfinite_label(w, t, m, "-inf", "fasta")),
    Case("label-float32-overflow-csv", lambda w, t, m: _nonfinite_label(w, t, m, "1e39", "csv")),
    # bad numbers: refused by argparse
    Case("generate-num-samples-0", _arg("generate", "--model", "MODEL", "--num-samples", "0"), argparse=True),
    Case("generate-max-new-tokens-neg", _arg("generate", "--model", "MODEL", "--max-new-tokens", "-1"), argparse=True),
    Case("generate-top-p-0", _arg("generate", "--model", "MODEL", "--top-p", "0"), argparse=True),
    Case("generate-top-p-nan", _arg("generate", "--model", "MODEL", "--top-p", "nan"), argparse=True),
    Case("generate-top-k-neg", _arg("generate", "--model", "MODEL", "--top-k", "-2"), argparse=True),
    Case("generate-temperature-neg", _arg("generate", "--model", "MODEL", "--temperature", "-0.5"), argparse=True),
    Case("eval-seq-len-neg", _arg("eval", "--model", "MODEL", "--data", "PACK", "--seq-len", "-5"), argparse=True),
    Case("eval-batch-size-0", _arg("eval", "--model", "MODEL", "--data", "PACK", "--batch-size", "0"), argparse=True),
    Case("eval-max-windows-0", _arg("eval", "--model", "MODEL", "--data", "PACK", "--max-windows", "0"), argparse=True),
    Case("eval-chunk-size-0", _arg("eval", "--model", "MODEL", "--data", "PACK", "--chunk-size", "0"), argparse=True),
    Case("score-chunk-size-0", _arg("score", "--model", "MODEL", "--input", "FASTA", "--out", "OUT", "--chunk-size", "0"),
         argparse=True),
    Case("embed-seq-len-neg", _arg("embed", "--model", "MODEL", "--input", "FASTA", "--out", "OUT", "--seq-len", "-5"),
         argparse=True),
    Case("embed-chunk-size-0", _arg("embed", "--model", "MODEL", "--input", "FASTA", "--out", "OUT", "--chunk-size", "0"),
         argparse=True),
    Case("predict-max-len-0", _arg("predict", "--model", "HEAD", "--sequence", "ACGT", "--max-len", "0"), argparse=True),
    Case("predict-batch-size-0", _arg("predict", "--model", "HEAD", "--sequence", "ACGT", "--batch-size", "0"),
         argparse=True),
    Case("finetune-epochs-0", _arg("finetune", "--model", "MODEL", "--task", "regression", "--train", "FASTA",
                                   "--epochs", "0"), argparse=True),
    Case("finetune-max-len-text", _arg("finetune", "--model", "MODEL", "--task", "regression", "--train", "FASTA",
                                       "--max-len", "lots"), argparse=True),
    Case("convert-tolerance-nan", _arg("convert", "PACK", "OUT", "--tolerance", "nan"), argparse=True),
    Case("convert-tolerance-neg", _arg("convert", "PACK", "OUT", "--tolerance", "-1"), argparse=True),
    Case("pack-seq-len-0", _arg("pack", "FASTA", "--out", "OUT", "--seq-len", "0"), argparse=True),
    Case("pack-workers-0", _arg("pack", "FASTA", "--out", "OUT", "--workers", "0"), argparse=True),
    Case("score-variants-window-0", _arg("score-variants", "--model", "MODEL", "--reference", "FASTA", "--variants",
                                         "FASTA", "--out", "OUT", "--window", "0"), argparse=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch):
    monkeypatch.delenv("HYENA_GLT_DEBUG", raising=False)
    monkeypatch.delenv("HYENA_GLT_VERIFY_SHARDS", raising=False)
    monkeypatch.delenv("HYENA_GLT_VERIFY_MODEL", raising=False)
    argv, fragments = case.setup(world, tmp_path, monkeypatch)
    rc, _, err = run(*argv)
    assert "Traceback" not in err, err
    assert rc == case.rc, err
    lines = visible_lines(err)
    if case.argparse:
        assert lines[0].startswith("usage: hyena-glt"), err
        assert lines[-1].startswith(f"hyena-glt {argv[0]}: error: argument"), err
        message = lines[-1]
    else:
        assert len(lines) == 1, err
        message = lines[0]
        assert message.startswith(f"hyena-glt {argv[0]}"), err
    for fragment in fragments:
        assert fragment in message, (fragment, err)


def test_debug_brings_the_traceback_back(world, tmp_path, monkeypatch):
    """HYENA_GLT_DEBUG=1: the same failure raises (with its traceback) instead of one line."""
    import yaml

    argv, _ = _bad_yaml(world, tmp_path, monkeypatch, "info")
    monkeypatch.setenv("HYENA_GLT_DEBUG", "1")
    with pytest.raises(yaml.YAMLError):
        cli_main([str(a) for a in argv])
    argv, _ = _nonfinite_label(world, tmp_path, monkeypatch, "nan", "csv")
    with pytest.raises(ValueError, match="not a finite number"):
        cli_main([str(a) for a in argv])


def test_damaged_shard_passes_with_verification_off(world, tmp_path, monkeypatch):
    """The one-line failure above comes from the checksum (with it off, the same damaged
    pack is read), and the check does not change what is evaluated."""
    monkeypatch.delenv("HYENA_GLT_VERIFY_SHARDS", raising=False)
    rc, good, err = run("eval", "--model", world.model, "--data", world.pack, "--batch-size", "4")
    assert rc == 0, err
    rc, unverified, err = run("eval", "--model", world.model, "--data", world.pack, "--batch-size", "4",
                              "--no-verify-shards")
    assert rc == 0, err
    assert json.loads(good) == json.loads(unverified)
    argv, _ = _zeroed_shard(world, tmp_path, monkeypatch, "eval")
    rc, damaged, err = run(*argv, "--no-verify-shards")
    assert rc == 0 and json.loads(damaged)["bits_per_base"] != json.loads(good)["bits_per_base"], err
    monkeypatch.setenv("HYENA_GLT_VERIFY_SHARDS", "0")
    rc, _, err = run(*argv)
    assert rc == 0, err


def test_flipped_weights_pass_with_verification_off(world, tmp_path, monkeypatch):
    """The one-line refusal above comes from checksums.json: with HYENA_GLT_VERIFY_MODEL=0 the same
    damaged directory is read, and evaluates to another loss (what went unnoticed before)."""
    monkeypatch.delenv("HYENA_GLT_VERIFY_MODEL", raising=False)
    rc, good, err = run("eval", "--model", world.model, "--data", world.pack, "--batch-size", "4")
    assert rc == 0, err
    d = copy_dir(world.model, tmp_path / "model")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-(8 + len(data) // 3)] ^= 0x40  # a high exponent bit of a weight inside the tensor data
    (d / "model.safetensors").write_bytes(bytes(data))
    rc, _, err = run("eval", "--model", d, "--data", world.pack, "--batch-size", "4")
    assert rc == 2 and "damaged: sha256" in err, err
    monkeypatch.setenv("HYENA_GLT_VERIFY_MODEL", "0")
    rc, damaged, err = run("eval", "--model", d, "--data", world.pack, "--batch-size", "4")
    assert rc == 0, err
    assert json.loads(damaged)["bits_per_base"] != json.loads(good)["bits_per_base"]


def test_model_dir_without_checksums_still_loads(world, tmp_path, monkeypatch):
    """A directory saved before checksums were recorded loads as before, and the command says
    once that its files were not verified."""
    monkeypatch.delenv("HYENA_GLT_VERIFY_MODEL", raising=False)
    d = copy_dir(world.model, tmp_path / "old-model")
    (d / "checksums.json").unlink()
    rc, out, err = run("eval", "--model", d, "--data", world.pack, "--batch-size", "4")
    assert rc == 0, err
    assert err.count("has no checksums.json") == 1 and "without verification" in err, err
    rc, ref, _ = run("eval", "--model", world.model, "--data", world.pack, "--batch-size", "4")
    assert json.loads(out)["bits_per_base"] == json.loads(ref)["bits_per_base"]
    rc, out, err = run("info", "--verify", d)
    assert rc == 1 and "nothing to verify" in out, out + err


def test_info_verify_reports_every_file(world, tmp_path, monkeypatch):
    monkeypatch.delenv("HYENA_GLT_VERIFY_MODEL", raising=False)
    rc, out, err = run("info", "--verify", world.head)
    assert rc == 0, err
    lines = out.splitlines()
    for name in ("config.json", "head.json", "model.safetensors"):
        assert any(line.split()[:2] == [name, "ok"] for line in lines), out
    assert "all 3 recorded file(s) match checksums.json" in out and "a fine-tuned task head" in out, out
    d = copy_dir(world.head, tmp_path / "head")
    flip_tensor_bits(d / "model.safetensors")
    (d / "head.json").unlink()
    (d / "notes.txt").write_text("mine")
    rc, out, err = run("info", "--verify", d)
    assert rc == 1 and not err.strip(), err
    status = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert status["config.json"].startswith("ok")
    assert status["model.safetensors"].startswith("damaged: sha256")
    assert status["head.json"].startswith("missing, but checksums.json lists it")
    assert status["notes.txt"].startswith("not recorded")
    assert "2 of 3 recorded file(s) damaged or missing: head.json, model.safetensors" in out, out


def test_gzip_label_file_damage_is_one_line(world, tmp_path):
    f = tmp_path / "labels.csv.gz"
    f.write_bytes(gzip.compress(b"sequence,label\nACGT,a\nACGG,b\n")[:-12])
    rc, _, err = run("finetune", "--model", world.model, "--task", "seq-cls", "--train", f, "--out", tmp_path / "ft")
    assert rc == 2 and len(visible_lines(err)) == 1 and "Traceback" not in err, err
    assert str(f) in err and "gzip" in err


# ----------------------------------------------------------------------------
# Every bad input either works as documented (README "Data tools" table) or fails with

REPO = Path(__file__).resolve().parents[2]
OPTS = ["--seq-len", "1000", "--min-len", "1", "--val-fraction", "0", "--progress", "none"]


def bgzip(data: bytes) -> bytes:
    """BGZF: gzip members of <= 64 KiB with a 'BC' extra field, plus the empty EOF block."""
    def block(chunk: bytes) -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        comp = c.compress(chunk) + c.flush()
        head = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 6) + b"BC" + struct.pack("<HH", 2, 25 + len(comp))
        return head + comp + struct.pack("<II", zlib.crc32(chunk), len(chunk))

    return b"".join(block(data[i : i + 65280]) for i in range(0, len(data), 65280)) + block(b"")


@pytest.fixture
def lam(lambda_phage):
    return read_fasta(lambda_phage)[0]


def one_line_error(rc: int, err: str, path: Path, *words: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0], err
    for w in words:
        assert w in lines[0], err


def make_bad(kind: str, d: Path, lambda_gz: Path, lam) -> Path:
    name, seq = lam
    if kind == "truncated_gzip":
        p = d / "truncated.fa.gz"
        p.write_bytes(lambda_gz.read_bytes()[:7000])
    elif kind == "binary":
        p = d / "binary.fa"
        p.write_bytes(zlib.compress(seq))  # compressed bytes without a gzip header
    elif kind == "not_fasta":
        p = d / "notes.fa"
        p.write_text("Sequencing run notes\nlane 1: ok\n")
    elif kind == "fastq":
        p = d / "reads.fa"
        p.write_bytes(b"@read1\n" + seq[:50] + b"\n+\n" + b"I" * 50 + b"\n")
    elif kind == "empty":
        p = d / "empty.fa"
        p.write_bytes(b"")
    elif kind == "empty_gzip":
        p = d / "empty.fa.gz"
        p.write_bytes(gzip.compress(b"\n"))
    elif kind == "digits":
        p = d / "genbank_style.fa"
        p.write_bytes(b">x\n" + seq[:120] + b"\n1 " + seq[120:180] + b"\n")
    elif kind == "space":
        p = d / "spaces.fa"
        p.write_bytes(b">a\n" + seq[:100] + b"\n>b\n" + seq[:60] + b" \n")
    elif kind == "id_not_utf8":
        p = d / "latin1_ids.fa"
        p.write_bytes(b">a\n" + seq[:100] + b"\n>caf\xe9 description\n" + seq[:60] + b"\n")
    elif kind == "bzip2":
        p = d / "lambda.fa.bz2"
        p.write_bytes(bz2.compress(b">x\n" + seq + b"\n"))
    else:
        raise AssertionError(kind)
    return p


BAD = {
    "truncated_gzip": ("truncated gzip file", "line"),
    "binary": ("binary content",),
    "not_fasta": ("not a FASTA file", "line 1"),
    "fastq": ("FASTQ",),
    "empty": ("empty file",),
    "empty_gzip": ("empty file",),
    "digits": ("record 'x' line 3", "'1'"),
    "space": ("record 'b' line 4", "space"),
    "bzip2": ("bzip2",),
    "id_not_utf8": ("line 3: the record id is not UTF-8", "0xe9"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_fails_with_one_line(kind, tmp_path, lambda_phage, lam):
    bad = make_bad(kind, tmp_path, lambda_phage, lam)
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", lambda_phage, bad, "--out", out, *OPTS)
    one_line_error(rc, err, bad, *BAD[kind])
    assert not (out / "manifest.json").exists()

    rc, _, err = run_cli("pack", lambda_phage, bad, "--out", tmp_path / "skip", *OPTS, "--skip-bad-files")
    assert rc == 1, err  # finished, but not everything was processed
    m = manifest(tmp_path / "skip")
    assert [s["path"] for s in m["skipped_files"]] == [str(bad)]
    assert BAD[kind][0] in m["skipped_files"][0]["reason"]
    assert m["input_totals"]["bases"] == len(lam[1])  # the good file is packed in full
    assert b"".join(s["seq"] for _, s in sorted(pack_samples(tmp_path / "skip").items())) == lam[1]
    rc, stdout, _ = run_cli("data", "stats", tmp_path / "skip")
    assert rc == 0 and f"SKIPPED {bad}" in stdout


def test_truncated_gzip_through_the_installed_command(tmp_path, lambda_phage, lam):
    bad = make_bad("truncated_gzip", tmp_path, lambda_phage, lam)
    exe = Path(sys.executable).parent / "hyena-glt"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "launch.cli"]
    proc = subprocess.run([*cmd, "pack", str(bad), "--out", str(tmp_path / "o"), *OPTS],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    one_line_error(proc.returncode, proc.stderr, bad, "truncated gzip")


def test_stdout_closed_early_is_not_an_error(world):
    """`hyena-glt data stats PACK | head -1`: the reader goes away before the command has written
    everything. That was `error: Broken pipe (EPIPE)` and exit 2; now it is quiet, exit 141 (as a
    process killed by SIGPIPE). The pipe is closed before the command (still starting) writes."""
    exe = Path(sys.executable).parent / "hyena-glt"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "launch.cli"]
    proc = subprocess.Popen([*cmd, "data", "stats", str(world.pack)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert rc in (0, 141) and not err.strip(), (rc, err)


def test_missing_inputs_fail_with_one_line(tmp_path):
    for spec in (tmp_path / "nope.fa", tmp_path / "*.fasta"):
        rc, _, err = run_cli("pack", spec, "--out", tmp_path / "o", *OPTS)
        one_line_error(rc, err, spec)
    (tmp_path / "emptydir").mkdir()
    rc, _, err = run_cli("pack", tmp_path / "emptydir", "--out", tmp_path / "o", *OPTS)
    one_line_error(rc, err, tmp_path / "emptydir", "no FASTA files")
    lst = tmp_path / "inputs.txt"
    lst.write_text("# my inputs\nmissing.fa\n")
    rc, _, err = run_cli("pack", lst, "--out", tmp_path / "o", *OPTS)
    one_line_error(rc, err, lst, "line 2")


def test_bad_option_is_refused_by_argparse(tmp_path, lambda_phage):
    rc, _, err = run_cli("pack", lambda_phage, "--out", tmp_path / "o", "--max-n-fraction", "1.5")
    lines = err.strip().splitlines()  # refused by argparse (launch/args.py fraction): the usage, then one error line
    assert rc == 2 and "Traceback" not in err and lines[0].startswith("usage: hyena-glt pack"), err
    assert lines[-1] == "hyena-glt pack: error: argument --max-n-fraction: must be in [0, 1], got 1.5", err


def _pack_seqs(out: Path) -> dict[tuple[str, int], bytes]:
    return {(s["meta"]["record_id"], s["meta"]["start"]): s["seq"] for s in pack_samples(out).values()}


def test_inputs_that_work(tmp_path, lambda_phage, ecoli, lam):
    """CRLF, one very long line, bgzip, multi-member gzip, an empty record, T+U in one
    record, and a directory / glob / list file as INPUT: all give the same bases."""
    name, seq = lam
    eco = read_fasta(ecoli)[0][1][:300_000]
    d = tmp_path / "in"
    d.mkdir()
    plain = write_fasta(d / "plain.fa", [(name, seq)], width=70)
    crlf = write_fasta(d / "crlf.fa", [(name, seq)], width=70, crlf=True)
    long_line = write_fasta(d / "long.fa", [("eco", eco)], width=0)  # 300 kb on one line
    (d / "bgzipped.fa.gz").write_bytes(bgzip(b">eco\n" + eco + b"\n"))
    (d / "multi.fa.gz").write_bytes(gzip.compress(b">eco\n" + eco[:150_000] + b"\n") + gzip.compress(eco[150_000:] + b"\n"))
    mixed = d / "records.fa"
    mixed.write_bytes(b">empty1 no sequence\n>real\n" + seq[:3000] + b"\n>tu\nACGTUACGU\n>empty2\n")

    def run(*inp, extra=()):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*')))}"
        rc, _, err = run_cli("pack", *inp, "--out", out, *OPTS, *extra)
        return rc, err, out

    rc, _, ref = run(plain)
    rc2, _, crlf_out = run(crlf)
    assert rc == rc2 == 0 and _pack_seqs(crlf_out) == _pack_seqs(ref)
    outs = [run(p)[2] for p in (long_line, d / "bgzipped.fa.gz", d / "multi.fa.gz")]
    assert _pack_seqs(outs[0]) == _pack_seqs(outs[1]) == _pack_seqs(outs[2])
    assert b"".join(v for _, v in sorted(_pack_seqs(outs[0]).items())) == eco
    assert [e["compression"] for e in manifest(outs[1])["inputs"]] == ["bgzip"]

    rc, err, out = run(mixed)
    assert rc == 0
    assert "record 'empty1'" in err and "record 'empty2'" in err and "no sequence" in err
    m = manifest(out)
    assert m["dropped"]["empty_record"]["records"] == 2 and m["input_totals"]["records"] == 4
    metas = {s["meta"]["record_id"]: s["meta"] for s in pack_samples(out).values()}
    assert set(metas) == {"real", "tu"} and metas["tu"]["seq_type"] == "mixed"

    lst = tmp_path / "list.txt"
    lst.write_text(f"{plain}\n# comment\n\nin/{crlf.name}\n")  # relative paths: from the list's folder
    rc, _, out = run(lst)
    assert rc == 0 and [e["path"] for e in manifest(out)["inputs"]] == [str(plain), str(crlf)]
    rc, _, out = run(d)  # a directory: every FASTA in it, sorted
    assert rc == 0 and [Path(e["path"]).name for e in manifest(out)["inputs"]] == \
        ["bgzipped.fa.gz", "crlf.fa", "long.fa", "multi.fa.gz", "plain.fa", "records.fa"]
    rc, _, out = run(str(d / "*.fa.gz"))
    assert rc == 0 and len(manifest(out)["inputs"]) == 2


def test_read_only_inputs_get_no_index_files(tmp_path, lambda_phage):
    before = sorted(p.name for p in lambda_phage.parent.iterdir())
    rc, _, _ = run_cli("pack", lambda_phage, "--out", tmp_path / "o", *OPTS)
    assert rc == 0 and sorted(p.name for p in lambda_phage.parent.iterdir()) == before


def test_skipped_file_leaves_nothing_behind(tmp_path, lambda_phage, ecoli, lam):
    """A truncated gzip between good files: pyfastx alone would return its first part as a
    shortened record; with --skip-bad-files none of it may reach a shard, while shards of
    the file before it are kept and the file after it is packed."""
    eco = read_fasta(ecoli)[0][1]
    good2 = write_fasta(tmp_path / "good2.fa", [("good2", eco[-200_000:])])
    bad = tmp_path / "cut.fa.gz"
    bad.write_bytes(gzip.compress(b">cut\n" + eco[:1_000_000] + b"\n")[:200_000])
    out = tmp_path / "out"
    args = ["--seq-len", "1000", "--shard-size-mb", "0.02", "--val-fraction", "0", "--progress", "none", "--workers", "2"]
    rc, _, err = run_cli("pack", lambda_phage, bad, good2, "--out", out, *args, "--skip-bad-files")
    assert rc == 1, err
    assert f"SKIPPED {bad}: truncated gzip" in err
    samples = pack_samples(out)
    assert {s["meta"]["record_id"] for s in samples.values()} == {lam[0], "good2"}
    m = manifest(out)
    assert m["input_totals"]["bases"] == len(lam[1]) + 200_000
    assert sum(s["bases"] for s in m["shards"]) == len(lam[1]) + 200_000
    assert set(p.name for p in out.glob("*.tar")) == {s["path"] for s in m["shards"]}
    rc, _, err = run_cli("pack", lambda_phage, bad, good2, "--out", tmp_path / "strict", *args)
    one_line_error(rc, err, bad, "truncated gzip")
