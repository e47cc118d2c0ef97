"""Conservation tracks: `pack --conservation` stores each window's per-base scores beside its
bases, the loaders hand them over as `conservation` (B, L) aligned with input_ids, both
strands (packed and load-time reverse complement) keep each score with its base, and a bad
track is one line naming its file.

The expected values come from the synthetic tracks written here and the window coordinates
in each sample's JSON, read from the tars with `tarfile`, not with data_tools."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import run_cli
from support.data import pack_samples, read_fasta, revcomp, write_fasta

from data_tools import GlobalBatchLoader, PackedDataset, eval_batches
from hyena_glt.tokenizer import BOS_ID, NUM_SPECIAL

SEQ_LEN = 700
COMMON = ["--seq-len", str(SEQ_LEN), "--stride", "600", "--min-len", "50", "--reverse-complement", "both",
          "--shard-size-mb", "0.02", "--val-fraction", "0", "--progress", "none"]


@pytest.fixture
def genome(tmp_path, lambda_phage):
    """Two records (one soft-masked in part), their tracks: an .npy for the first, a bedGraph
    with a gap (bases without a score) for the second."""
    seq = read_fasta(lambda_phage)[0][1]
    a = bytearray(seq[:9_000])
    a[2_000:2_500] = a[2_000:2_500].lower()
    records = {"phage_a": bytes(a), "phage_b": seq[20_000:25_537]}
    fasta = write_fasta(tmp_path / "g.fa", list(records.items()))
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    rng = np.random.default_rng(7)
    scores = {"phage_a": rng.normal(0, 3, len(records["phage_a"])).astype(np.float32)}
    np.save(tracks / "phage_a.npy", scores["phage_a"])
    b = np.full(len(records["phage_b"]), np.nan, np.float32)
    lines = ["track type=bedGraph name=phyloP"]
    for start in range(0, 5_000, 250):  # 250-base intervals, then no score for the last 537 bases
        value = round(float(rng.uniform(-5, 8)), 3)
        lines.append(f"phage_b\t{start}\t{start + 250}\t{value}")
        b[start : start + 250] = value
    (tracks / "b.bedGraph.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    scores["phage_b"] = b
    return fasta, tracks, records, scores


def _expected(scores: dict, meta: dict) -> np.ndarray:
    s = scores[meta["record_id"]][meta["start"] : meta["end"]].astype(np.float16)
    return s[::-1] if meta["strand"] == "-" else s


def test_tracks_go_through_pack_into_the_loader(tmp_path, genome):
    fasta, tracks, records, scores = genome
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", fasta, "--out", out, *COMMON, "--conservation", tracks, "--workers", "2")
    assert rc == 0, err
    samples = pack_samples(out)
    assert len(samples) > 30 and {s["meta"]["strand"] for s in samples.values()} == {"+", "-"}
    for s in samples.values():  # the shards: one float16 per base, the '-' strand's reversed
        got = np.frombuffer(s["cons"], "<f2")
        np.testing.assert_array_equal(got, _expected(scores, s["meta"]))
        assert len(got) == len(s["seq"])
    assert any(np.isnan(np.frombuffer(s["cons"], "<f2")).any() for s in samples.values())  # the bedGraph's gap

    ds = PackedDataset(out)
    order = list(samples.values())  # one split: the manifest's order is the shards' (sorted) and theirs
    assert len(ds) == len(order)
    for i, s in enumerate(order):
        seq, _, cons = ds.read_sample(i)
        assert seq == s["seq"] and cons.tobytes() == s["cons"]

    # Batches: conservation[b, i] scores the base at input_ids[b, i] (the window shifted by
    # one behind BOS); BOS, padding and bases without a score get 0.
    n = 0
    for batch in eval_batches(out, SEQ_LEN + 5, batch_size=4, split="train"):
        assert batch["conservation"].dtype == torch.float32
        assert batch["conservation"].shape == batch["input_ids"].shape
        for b in range(batch["input_ids"].shape[0]):
            s = order[n]
            n += 1
            want = np.zeros(SEQ_LEN + 5, np.float32)
            want[1 : len(s["seq"])] = np.nan_to_num(_expected(scores, s["meta"])[:-1].astype(np.float32))
            np.testing.assert_array_equal(batch["conservation"][b].numpy(), want)
            assert batch["input_ids"][b, 0] == BOS_ID
            ids = batch["input_ids"][b, 1 : len(s["seq"])].numpy()
            assert bytes((ids - NUM_SPECIAL).astype(np.uint8)) == s["seq"][:-1].upper()
    assert n == len(ds)


def test_load_time_reverse_complement_reverses_the_scores(tmp_path, genome):
    fasta, tracks, records, scores = genome
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", fasta, "--out", out, "--seq-len", str(SEQ_LEN), "--min-len", "50", "--val-fraction",
                         "0", "--progress", "none", "--conservation", tracks)
    assert rc == 0, err
    ds = PackedDataset(out)
    loader = GlobalBatchLoader(out, seq_len=SEQ_LEN, global_batch_size=4, micro_batch_size=4,
                               reverse_complement_prob=1.0, seed=1)
    for _ in range(3):
        refs, flips, _ = loader.global_batch_refs()
        batch = loader.next_global_batch()[0]
        for b, (_, i) in enumerate(refs):
            assert flips[b]
            seq, _, cons = ds.read_sample(i)
            flipped = cons[::-1].astype(np.float32)
            want = np.zeros(SEQ_LEN, np.float32)
            want[1 : len(seq)] = np.nan_to_num(flipped[:-1])
            np.testing.assert_array_equal(batch["conservation"][b].numpy(), want)
            ids = batch["labels"][b, : len(seq)].numpy()
            assert bytes((ids - NUM_SPECIAL).astype(np.uint8)) == revcomp(seq).upper()


def test_a_changed_track_is_not_kept_on_resume(tmp_path, genome):
    fasta, tracks, records, scores = genome
    out = tmp_path / "out"
    args = ["pack", fasta, "--out", out, *COMMON, "--conservation", tracks]
    assert run_cli(*args)[0] == 0
    np.save(tracks / "phage_a.npy", scores["phage_a"] + 1)
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    for s in pack_samples(out).values():
        if s["meta"]["record_id"] == "phage_a":
            np.testing.assert_array_equal(np.frombuffer(s["cons"], "<f2"),
                                          _expected({"phage_a": scores["phage_a"] + 1}, s["meta"]))


@pytest.mark.parametrize("damage, message", [
    ("short", "phage_a.npy: track of record 'phage_a': 8999 values for a record of 9000 bases"),
    ("nan", "phage_a.npy: track of record 'phage_a': value at position 17 is NaN (1 such value(s))"),
    ("huge", "phage_a.npy: track of record 'phage_a': value at position 3 is 1e+06, outside float16's range"),
    ("2d", "phage_a.npy: track of record 'phage_a': expected a 1-D array, got shape (2, 4500)"),
    ("missing", "g.fa: record 'phage_a' has no conservation track in"),
    ("past_end", "b.bedGraph.gz: interval phage_b:5500-5600 runs past the end of the record (5537 bases)"),
    ("overlap", "b.bedGraph.gz: intervals phage_b:0-250 and phage_b:100-200 overlap"),
    ("text", "b.bedGraph.gz: not a bedGraph file (chrom start end value per line, after 1 header line(s)): "),
    ("twice", "phage_a.npy: a second track for record 'phage_a' (the first is in"),
])
def test_bad_tracks_are_one_line_naming_the_file(tmp_path, genome, damage, message):
    fasta, tracks, records, scores = genome
    a, bg = tracks / "phage_a.npy", tracks / "b.bedGraph.gz"
    lines = gzip.decompress(bg.read_bytes()).decode().splitlines()
    if damage == "short":
        np.save(a, scores["phage_a"][:-1])
    elif damage in ("nan", "huge"):
        bad = scores["phage_a"].copy()
        bad[17 if damage == "nan" else 3] = np.nan if damage == "nan" else 1e6
        np.save(a, bad)
    elif damage == "2d":
        np.save(a, scores["phage_a"].reshape(2, -1))
    elif damage == "missing":
        a.unlink()
    elif damage in ("past_end", "overlap", "text"):
        extra = {"past_end": "phage_b\t5500\t5600\t1.0", "overlap": "phage_b\t100\t200\t1.0",
                 "text": "phage_b\t5100\tfive\t1.0"}[damage]
        bg.write_bytes(gzip.compress(("\n".join(lines + [extra]) + "\n").encode()))
    elif damage == "twice":
        (tracks / "a.bedGraph").write_text("phage_a\t0\t10\t1.0\n")
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", fasta, "--out", out, *COMMON, "--conservation", tracks)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (out / "manifest.json").exists()


def test_a_conservation_model_trains_on_a_pack_with_tracks_and_refuses_one_without(tmp_path, genome):
    import subprocess

    from support.training import REPO, child_env as _env, cli_command as _cli

    fasta, tracks, _, _ = genome
    common = ["--seq-len", "128", "--val-fraction", "0", "--progress", "none"]
    assert run_cli("pack", fasta, "--out", tmp_path / "with", *common, "--conservation", tracks)[0] == 0
    assert run_cli("pack", fasta, "--out", tmp_path / "without", *common)[0] == 0

    def train(pack):
        args = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "model.conservation=true", "train.steps=2",
                "train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_batches=0",
                f"data.train={pack}", "data.val=null", f"out_dir={tmp_path / 'run'}",
                f"checkpoint.dir={tmp_path / 'ckpt'}"]
        return subprocess.run([*_cli(), *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)

    proc = train(tmp_path / "without")
    assert proc.returncode == 2 and "model.conservation=true but the pack holds no conservation scores" in proc.stderr
    proc = train(tmp_path / "with")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_cli("convert", tmp_path / "ckpt", tmp_path / "model")[0] == 0
    from hyena_glt import load_causal_lm

    # The gates start at 0 and move only if the scores reached the blocks.
    gates = [p for n, p in load_causal_lm(tmp_path / "model").named_parameters() if n.endswith("conservation_gate")]
    assert gates and all(g.abs().max() > 0 for g in gates)
