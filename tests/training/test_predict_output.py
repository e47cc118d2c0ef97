"""`hyena-glt predict --output`: the TSV holds one row per input sequence (the --input records in
file order, then the --sequence ones), the header's columns (one probability column per class,
named by the class), and the predictions of the fine-tuned model computed here on each sequence
alone (the command pads sequences of different lengths into one batch: the padding must not
change a prediction). With --output nothing goes to stdout, and one summary line to stderr."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM

TRAIN = ["ACGTACGTAC", "GGGCCCGGGC", "ATATATATAT", "GCGCGCATAT", "TTTTAAAACC", "CAGTCAGTCA"] * 3


def label(seq: str) -> str:
    return "gc" if seq.count("G") + seq.count("C") > len(seq) // 2 else "at"


def test_predict_output_tsv_is_the_models_prediction(tmp_path):
    from hyena_glt import ByteTokenizer
    from hyena_glt.heads import load_head_model

    cfg = HyenaGLTConfig(pattern="SS", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=512)
    HyenaGLTForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{label(s)}\n" for s in TRAIN))
    rc, out, err = run_cli("finetune", "--model", tmp_path / "lm", "--task", "seq-cls", "--train",
                           tmp_path / "train.csv", "--out", tmp_path / "ft", "--epochs", "1", "--batch-size", "4",
                           "--max-steps", "3")
    assert rc == 0, (out + err)[-3000:]
    inputs = {"a1": "ACGTTGCA", "b2": "GGGCCCGCGCGCGGCC", "c3": "AT", "d4": "TTGACCATGGCAAT"}  # lengths differ
    (tmp_path / "new.fa").write_text("".join(f">{k}\n{v}\n" for k, v in inputs.items()))
    extra = ["CCCGGG", "ACGTACGTACGTACGTACGT"]
    rc, stdout, err = run_cli("predict", "--model", tmp_path / "ft", "--input", tmp_path / "new.fa",
                              *[a for s in extra for a in ("--sequence", s)], "--batch-size", "3",
                              "--output", tmp_path / "p.tsv")
    assert rc == 0, err
    assert stdout == ""  # the table goes to the file only
    assert len(err.splitlines()) == 1 and f"wrote 6 prediction(s) to {tmp_path / 'p.tsv'}" in err, err
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    rows = [x.split("\t") for x in lines]
    model, tok = load_head_model(tmp_path / "ft").eval(), ByteTokenizer()
    names = model.label_names
    assert sorted(names) == ["at", "gc"]
    assert rows[0] == ["id", "label", *[f"p_{n}" for n in names]]  # class-index order, named
    seqs = {**inputs, "seq1": extra[0], "seq2": extra[1]}
    assert [r[0] for r in rows[1:]] == list(seqs)
    for row, seq in zip(rows[1:], seqs.values()):
        assert len(row) == 2 + len(names), row
        with torch.no_grad():
            probs = model(tok.encode(seq.encode(), add_bos=True).ids[None]).logits[0].float().softmax(-1)
        got = [float(x) for x in row[2:]]
        assert abs(sum(got) - 1) <= 1e-3, row
        assert got == pytest.approx(probs.tolist(), abs=1e-4), (row, probs)  # printed to 4 decimals
        assert row[1] == names[int(probs.argmax())], (row, probs)
    rc, stdout, err = run_cli("predict", "--model", tmp_path / "ft", "--input", tmp_path / "new.fa",
                              *[a for s in extra for a in ("--sequence", s)], "--batch-size", "3")
    assert rc == 0 and err == "" and stdout.splitlines() == lines  # without --output: the same table on stdout


def test_class_columns_split_only_per_class_number_lists():
    from launch.finetune.commands import _class_columns

    header, rows = _class_columns(["id", "label", "probabilities"], [["a", "x", "0.2,0.8"], ["b", "y", "0.9,0.1"]],
                                  ["x", "y"])
    assert header == ["id", "label", "p_x", "p_y"] and rows == [["a", "x", "0.2", "0.8"], ["b", "y", "0.9", "0.1"]]
    header, rows = _class_columns(["id", "class", "scores"], [["a", "x", "1,2,3"]], ["x", "y", "z"])
    assert header == ["id", "class", "scores_x", "scores_y", "scores_z"]
    kept = (["id", "labels"], [["a", "0,1"]])  # token labels, not numbers per class
    assert _class_columns(*kept, ["x", "y", "z"]) == kept
    kept = (["id", "prediction"], [["a", "0.5"]])  # regression: one value
    assert _class_columns(*kept, ["0"]) == kept
