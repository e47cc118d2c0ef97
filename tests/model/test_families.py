"""One model-family registry: every command that loads a model works on both families.

The token-merging U-shape (BLTForCausalLM) and the plain model are built and loaded through
hyena_glt.registry / hyena_glt.pretrained; each CLI command runs on a saved token-merging
directory here, and a directory of the wrong kind is refused with one line.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from hyena_glt import (
    FAMILIES,
    HyenaGLTConfig,
    HyenaGLTForCausalLM,
    build_backbone,
    build_causal_lm,
    family_of,
    inspect_pretrained,
    load_causal_lm,
    load_pretrained,
)
from hyena_glt.blt import BLTForCausalLM, BLTModel
from launch.cli import main

SMALL = dict(pattern="S*", d_model=32, num_heads=2, num_filter_groups=4, medium_filter_len=16, modal_order=4,
             max_seq_len=256, seed=3)
MERGING = dict(patching="entropy", patch_size=4, max_patch=8, local_encoder_pattern="S", local_decoder_pattern="S",
               entropy_d_model=16, entropy_pattern="S")


def test_registry_picks_the_family_and_the_plain_class_refuses_a_merging_config():
    plain, merging = HyenaGLTConfig(**SMALL), HyenaGLTConfig(**SMALL, **MERGING)
    assert set(FAMILIES) == {"plain", "token-merging"}
    assert family_of(plain).name == "plain" and family_of(merging).name == "token-merging"
    assert type(build_causal_lm(plain)) is HyenaGLTForCausalLM and type(build_causal_lm(merging)) is BLTForCausalLM
    assert type(build_backbone(merging)) is BLTModel
    with pytest.raises(ValueError, match="patching: 'entropy' is not a config of HyenaGLTForCausalLM"):
        HyenaGLTForCausalLM(merging)
    with pytest.raises(ValueError, match="not a config of BLTForCausalLM"):
        BLTForCausalLM(plain)


@pytest.fixture(scope="module")
def merging_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("blt")
    model = build_causal_lm(HyenaGLTConfig(**SMALL, **MERGING))
    model.save_pretrained(d / "lm")
    rng = random.Random(0)
    seqs = ["".join(rng.choice("GC" if i % 2 else "AT") for _ in range(40)) for i in range(24)]
    (d / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{'gc' if i % 2 else 'at'}\n" for i, s in enumerate(seqs)))
    (d / "seqs.fa").write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs[:5])))
    return d


def test_every_command_runs_on_a_token_merging_model(merging_dir, tmp_path, capsys):
    lm = merging_dir / "lm"
    assert type(load_causal_lm(lm)) is BLTForCausalLM

    assert main(["info", str(lm)]) == 0
    out = capsys.readouterr().out
    n = build_causal_lm(HyenaGLTConfig(**SMALL, **MERGING)).num_parameters()
    assert "family token-merging" in out and f"{n:,} parameters" in out and "entropy patcher" in out

    assert main(["generate", "--model", str(lm), "--prompt", "ACGT", "--max-new-tokens", "6", "--num-samples", "2"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 2 and all(len(s) == 10 and s.startswith("ACGT") for s in lines)

    assert main(["eval", "--model", str(lm), "--data", str(merging_dir / "seqs.fa"), "--seq-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bases"] == 5 * 40 and 0 < result["bits_per_base"] < 10

    assert main(["embed", "--model", str(lm), "--input", str(merging_dir / "seqs.fa"), "--out", str(tmp_path / "e.npy"),
                 "--seq-len", "32"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (5, 32) and np.isfinite(emb).all()

    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(lm), "--task", "seq-cls", "--train", str(merging_dir / "train.csv"),
                 "--out", str(ft), "--epochs", "1", "--batch-size", "8", "--max-len", "40"]) == 0
    capsys.readouterr()
    assert type(load_pretrained(ft).model) is BLTModel
    saved = inspect_pretrained(ft)
    assert saved.kind == "head" and saved.family.name == "token-merging"

    assert main(["predict", "--model", str(ft), "--input", str(merging_dir / "seqs.fa")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("id\tlabel") and len(rows) == 6 and all(r.split("\t")[1] in ("at", "gc") for r in rows[1:])

    # A fine-tuned head directory: embed and info take it, generate/eval refuse it in one line.
    assert main(["embed", "--model", str(ft), "--input", str(merging_dir / "seqs.fa"), "--out", str(tmp_path / "h.npy"),
                 "--seq-len", "32"]) == 0
    assert main(["info", str(ft)]) == 0
    assert "fine-tuned task head (seq-cls), family token-merging" in capsys.readouterr().out
    assert main(["generate", "--model", str(ft), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no language-model head" in err


def test_info_counts_a_merging_config_file(tmp_path, capsys):
    cfg = HyenaGLTConfig(**SMALL, **MERGING)
    cfg.to_yaml(tmp_path / "m.yaml")
    assert main(["info", str(tmp_path / "m.yaml")]) == 0
    assert f"{build_causal_lm(cfg).num_parameters():,} parameters" in capsys.readouterr().out


def test_backbone_of_a_saved_lm_equals_the_lm_hidden_states(merging_dir):
    from hyena_glt import load_backbone

    ids = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    lm, bb = load_causal_lm(merging_dir / "lm").eval(), load_backbone(merging_dir / "lm").eval()
    with torch.no_grad():
        assert torch.equal(lm(ids).hidden_states, bb(ids))
