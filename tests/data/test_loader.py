"""Loaders: the batch convention, the same global batches for DP=1 and DP=2 (two torchrun
processes), exact resume, epochs, mixing, reverse-complement augmentation, evaluation
order, and the removed data.num_workers setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import free_port, genome_path
from conftest import run_cli
from support.data import pack_samples, read_fasta, revcomp, write_fasta

from data_tools import GlobalBatchLoader, PackedDataset, eval_batches
from hyena_glt.tokenizer import BOS_ID, PAD_ID, SeqType

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("packs")
    name, seq = read_fasta(genome_path("ecoli_k12_w3110.fasta.gz"))[0]
    part = bytearray(seq[:250_000])
    for a in range(0, 250_000, 25_000):
        part[a + 300 : a + 900] = part[a + 300 : a + 900].lower()  # soft-masked stretches
    eco = write_fasta(d / "eco.fa", [(name, bytes(part)), ("eco_tail", seq[-2_345:])])
    common = ["--seq-len", "1000", "--min-len", "1", "--shard-size-mb", "0.05", "--progress", "none"]
    out = {}
    for key, inputs, extra in (
        ("bacteria", [eco], ["--val-fraction", "0"]),
        ("phage", [genome_path("lambda_phage.fasta.gz")], ["--val-fraction", "0"]),
        ("val", [eco], ["--val-fraction", "1"]),
    ):
        out[key] = d / key
        rc, _, err = run_cli("pack", *inputs, "--out", out[key], *common, *extra)
        assert rc == 0, err
    return out


def _cat(micro_batches: list[dict]) -> dict:
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def test_batch_convention(packs):
    loader = GlobalBatchLoader(packs["bacteria"], seq_len=1100, global_batch_size=8, micro_batch_size=2, seed=3)
    ds = loader.datasets[0]
    saw_soft = saw_tail = False
    for _ in range(40):
        refs, _, _ = loader.global_batch_refs()
        mbs = loader.next_global_batch()
        assert len(mbs) == 4
        b = _cat(mbs)
        assert b["input_ids"].shape == b["labels"].shape == b["loss_weights"].shape == (8, 1100)
        assert (b["input_ids"].dtype, b["labels"].dtype, b["loss_weights"].dtype, b["seq_type"].dtype) == \
               (torch.int64, torch.int64, torch.float32, torch.int64)
        for row, (_, i) in enumerate(refs):
            window, seq_type = ds.read(i)
            n = len(window)
            raw = torch.tensor(list(window))
            upper = torch.where((raw >= 97) & (raw <= 122), raw - 32, raw)
            assert torch.equal(b["labels"][row, :n], upper + 4)  # every base is a target
            assert b["input_ids"][row, 0] == BOS_ID
            assert torch.equal(b["input_ids"][row, 1:n], b["labels"][row, : n - 1])  # shifted by one
            lower = (raw >= 97) & (raw <= 122)
            want = torch.where(lower, torch.tensor(0.1), torch.tensor(1.0))
            assert torch.equal(b["loss_weights"][row, :n], want)
            assert (b["labels"][row, n:] == PAD_ID).all() and (b["input_ids"][row, n:] == PAD_ID).all()
            assert (b["loss_weights"][row, n:] == 0).all()
            assert b["seq_type"][row] == seq_type == SeqType.DNA
            saw_soft |= bool(lower.any())
            saw_tail |= n < 1000
    assert saw_soft and saw_tail


DP_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from data_tools import GlobalBatchLoader
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = json.loads(sys.argv[1])
    result = {}
    # DP=2: each rank its slice. Then the two ranks as one tensor-parallel group (DP=1).
    for name, dp_rank, dp_size in (("dp", rank, world), ("tp", 0, 1)):
        loader = GlobalBatchLoader(cfg["data"], seq_len=cfg["seq_len"], global_batch_size=cfg["gbs"],
                                   micro_batch_size=cfg["mbs"], dp_rank=dp_rank, dp_size=dp_size,
                                   seed=cfg["seed"], reverse_complement_prob=0.5)
        steps = [loader.next_global_batch() for _ in range(cfg["steps"])]
        gathered = [None] * world
        dist.all_gather_object(gathered, steps)
        result[name] = gathered
    if rank == 0:
        torch.save(result, cfg["out"])
    dist.destroy_process_group()
""")


@pytest.mark.distributed
def test_same_global_batches_dp1_and_dp2(packs, tmp_path):
    data = {str(packs["bacteria"]): 0.7, str(packs["phage"]): 0.3}
    cfg = {"data": data, "seq_len": 1000, "gbs": 8, "mbs": 2, "seed": 11, "steps": 6, "out": str(tmp_path / "r.pt")}
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script), json.dumps(cfg)],
                   cwd=REPO, check=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = torch.load(tmp_path / "r.pt", weights_only=False)
    single = GlobalBatchLoader(data, seq_len=1000, global_batch_size=8, micro_batch_size=2, seed=11,
                               reverse_complement_prob=0.5)
    for step in range(6):
        want = _cat(single.next_global_batch())
        rank0, rank1 = result["dp"][0][step], result["dp"][1][step]
        assert len(rank0) == len(rank1) == 2  # 8 / (2 ranks x 2 per micro-batch)
        got = _cat(rank0 + rank1)  # DP rank r holds slots [4r, 4r + 4)
        for k in want:
            assert torch.equal(got[k], want[k]), (step, k)
        tp0, tp1 = _cat(result["tp"][0][step]), _cat(result["tp"][1][step])
        for k in want:
            assert torch.equal(tp0[k], tp1[k]) and torch.equal(tp0[k], want[k])


def test_resume_exactly_and_on_another_layout(packs):
    data = {str(packs["bacteria"]): 0.7, str(packs["phage"]): 0.3}
    kw = dict(seq_len=1000, global_batch_size=8, micro_batch_size=2, seed=5, reverse_complement_prob=0.3)
    loader = GlobalBatchLoader(data, **kw)
    for _ in range(3):
        loader.next_global_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a round trip through JSON
    want = [_cat(loader.next_global_batch()) for _ in range(4)]
    resumed = GlobalBatchLoader(data, **kw)
    resumed.load_state_dict(state)
    halves = [GlobalBatchLoader(data, dp_rank=r, dp_size=2, **kw) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    for w in want:
        got = _cat(resumed.next_global_batch())
        split = _cat(halves[0].next_global_batch() + halves[1].next_global_batch())
        for k in w:
            assert torch.equal(got[k], w[k]) and torch.equal(split[k], w[k])
    other = GlobalBatchLoader(data, **{**kw, "seed": 6})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_every_sample_once_per_epoch_and_new_order_each_epoch(packs):
    loader = GlobalBatchLoader(packs["phage"], seq_len=1000, global_batch_size=4, seed=2)
    n = len(loader.datasets[0])
    picks = []
    while len(picks) < 2 * n:
        refs, _, _ = loader.global_batch_refs()
        loader.next_global_batch()
        picks += [i for _, i in refs]
    assert sorted(picks[:n]) == list(range(n)) and sorted(picks[n : 2 * n]) == list(range(n))
    assert picks[:n] != picks[n : 2 * n] and picks[:n] != sorted(picks[:n])


def test_mixing_weights_are_deterministic(packs):
    data = {str(packs["bacteria"]): 0.7, str(packs["phage"]): 0.3}
    a = GlobalBatchLoader(data, seq_len=1000, global_batch_size=32, seed=9)
    b = GlobalBatchLoader(data, seq_len=1000, global_batch_size=32, seed=9)
    from_a = []
    for _ in range(60):
        ra, rb = a.global_batch_refs()[0], b.global_batch_refs()[0]
        assert ra == rb
        from_a += [d for d, _ in ra]
        # Advance without reading (the refs are what matter here).
        a.step, a.consumed = a.step + 1, a.global_batch_refs()[2]
        b.step, b.consumed = b.step + 1, b.global_batch_refs()[2]
    share = from_a.count(0) / len(from_a)
    assert abs(share - 0.7) < 0.04, share
    c = GlobalBatchLoader(data, seq_len=1000, global_batch_size=32, seed=10)
    assert c.global_batch_refs()[0] != GlobalBatchLoader(data, seq_len=1000, global_batch_size=32, seed=9).global_batch_refs()[0]


def test_reverse_complement_augmentation(packs):
    plain = GlobalBatchLoader(packs["bacteria"], seq_len=1000, global_batch_size=4, seed=1)
    flipped = GlobalBatchLoader(packs["bacteria"], seq_len=1000, global_batch_size=4, seed=1, reverse_complement_prob=1.0)
    ds = plain.datasets[0]
    for _ in range(5):
        refs = plain.global_batch_refs()[0]
        p, f = _cat(plain.next_global_batch()), _cat(flipped.next_global_batch())
        for row, (_, i) in enumerate(refs):
            window = ds.read(i)[0]
            n = len(window)
            rc = revcomp(window).upper()
            assert bytes((f["labels"][row, :n] - 4).tolist()) == rc
            assert bytes((p["labels"][row, :n] - 4).tolist()) == window.upper()


def test_eval_batches_fixed_order(packs):
    samples = pack_samples(packs["val"])  # tar order: shards sorted, then samples in file order
    ordered = [v["seq"] for v in samples.values()]
    batches = list(eval_batches(packs["val"], seq_len=1000, batch_size=16))
    got = [bytes((row[row > 0] - 4).tolist()) for b in batches for row in b["labels"]]
    assert got == [s.upper() for s in ordered]
    assert len(got) == len(PackedDataset(packs["val"], "val"))
    shards = [list(eval_batches(packs["val"], 1000, 16, dp_rank=r, dp_size=2)) for r in range(2)]
    interleaved = [b for pair in zip(shards[0], shards[1] + [None]) for b in pair if b is not None]
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(interleaved, batches))


def test_removed_num_workers_setting_is_dropped_with_a_warning():
    """data.num_workers never had an effect and was removed; configs (and the train_config
    stored in older checkpoints, which `reshard` re-validates) that still carry it load."""
    import warnings

    from launch.training.config import TrainConfig

    cfg = TrainConfig.load(REPO / "configs" / "tiny.yaml")
    assert "num_workers" not in cfg.dump()["data"]
    old = cfg.dump()
    old["data"]["num_workers"] = 2
    with pytest.warns(UserWarning, match="data.num_workers is ignored"):
        again = TrainConfig.model_validate(old)
    assert again.dump() == cfg.dump()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.model_validate(cfg.dump())  # no warning without the key


def test_shards_verified_on_first_use(packs, tmp_path, monkeypatch):
    """Each shard is checked against the manifest's sha256 the first time it is opened: the
    batches are the same with the check on or off, and a shard with bytes zeroed in place
    stops the loader with one line naming it and both checksums."""
    import hashlib
    import shutil

    from data_tools import dataset
    from data_tools.dataset import ShardChecksumError

    monkeypatch.delenv("HYENA_GLT_VERIFY_SHARDS", raising=False)
    kw = dict(seq_len=1000, global_batch_size=8, micro_batch_size=2, seed=3, reverse_complement_prob=0.5)
    on, off = GlobalBatchLoader(packs["bacteria"], **kw), GlobalBatchLoader(packs["bacteria"], verify_shards=False, **kw)
    assert on.datasets[0].verify and not off.datasets[0].verify
    for _ in range(6):
        a, b = _cat(on.next_global_batch()), _cat(off.next_global_batch())
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert on.state_dict() == off.state_dict()  # the setting is not part of the resume state

    # A file that passed is not hashed again in this process, whichever dataset opens it.
    hashed = []
    pread = os.pread

    def counting_pread(fd, n, offset):
        if n == dataset._HASH_CHUNK:
            hashed.append(fd)
        return pread(fd, n, offset)

    first = PackedDataset(packs["bacteria"], "train")
    [first.read(i) for i in range(len(first))]  # every shard opened (and verified, earlier or now)
    monkeypatch.setattr(os, "pread", counting_pread)
    again = PackedDataset(packs["bacteria"], "train")
    assert [again.read(i) for i in range(len(again))] == [first.read(i) for i in range(len(first))]
    assert hashed == []
    dataset._verified.clear()  # a new process
    [PackedDataset(packs["bacteria"], "train").read(i) for i in range(len(first))]
    assert len(hashed) >= len(first.shards)
    monkeypatch.setattr(os, "pread", pread)

    bad = shutil.copytree(packs["bacteria"], tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = manifest["shards"][2]
    shard = bad / entry["path"]
    data = bytearray(shard.read_bytes())
    data[1536:1736] = bytes(200)  # bases of the first sample, same size, same index
    shard.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    loader = GlobalBatchLoader(bad, **kw)
    with pytest.raises(ShardChecksumError) as err:
        for _ in range(200):  # well past one epoch: every shard gets opened
            loader.next_global_batch()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and str(shard) in msg and entry["sha256"] in msg and actual in msg
    with pytest.raises(ShardChecksumError, match=entry["path"]):
        list(eval_batches(bad, 1000, 16, split="train"))
    # Off (argument or environment): the damaged bytes are read as they are.
    assert len(list(eval_batches(bad, 1000, 16, split="train", verify_shards=False))) > 0
    monkeypatch.setenv("HYENA_GLT_VERIFY_SHARDS", "0")
    assert len(list(eval_batches(bad, 1000, 16, split="train"))) > 0
