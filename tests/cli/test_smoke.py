"""Smoke runs of `hyena-glt demo` and of the benchmarks `bench ops | cp | train | merge | generate`,
each with the smallest options it accepts, checked on what it reports: every row is there, every
time, rate and memory figure is finite (and positive where it is a time or a rate), and every ratio
equals the benchmark's formula recomputed here from the raw numbers the same report gives.
(`bench pack` and `bench gpu`: tests/data/test_data_stats.py, tests/cluster/test_gpu_check.py.)

The benchmarks run in this process (run_cli); each forks, spawns or launches what it measures
itself. The demo is the one `make demo` runs, at 2 training steps and 16 held-out windows.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from hyena_glt.kinds import KINDS



def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def positive(x) -> bool:
    return finite(x) and x > 0


def bench(tmp_path, target: str, *options) -> tuple[dict, str]:
    """`hyena-glt bench TARGET OPTIONS --json FILE`: (the JSON file, stdout)."""
    out = tmp_path / f"{target}.json"
    rc, stdout, err = run_cli("bench", target, *options, "--json", out)
    assert rc == 0, (stdout + err)[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == report  # the JSON line printed is the file
    return report, stdout


# ---------------------------------------------------------------------------- bench


def test_bench_ops(tmp_path):
    from hyena_glt.fftconv import conv_path
    from hyena_glt.modal import modal_path

    r, stdout = bench(tmp_path, "ops", "--d-model", "32", "--lengths", "64", "--repeats", "1", "--threads", "1")
    assert [(x["layer"], x["L"]) for x in r["layers"]] == [(code, 64) for code in KINDS]  # every registered kind
    for x in r["layers"]:
        assert positive(x["seconds"]) and finite(x["peak_mib"]), x
    by = {x["layer"]: x["seconds"] for x in r["layers"]}
    (ratios,) = r["ratios"]
    assert ratios["L"] == 64
    assert ratios["H_over_S"] == pytest.approx(by["H"] / by["S"], rel=1e-12)
    assert ratios["attention_over_H"] == pytest.approx(by["*"] / by["H"], rel=1e-12)
    assert [(c["filter"], c["L"]) for c in r["convolutions"]] == [("H", 64), ("D", 64)]
    for c in r["convolutions"]:
        assert c["picks"] == (modal_path(64) if c["filter"] == "H" else conv_path(128, 64)), c  # what the model runs
        for path in ("fft", "blocked", "reference", "dispatch"):
            assert positive(c[path]["ms"]) and finite(c[path]["peak_mib"]), (path, c)
        # the table's last column: the reference path's time over the one the dispatch picks
        label = "H modal" if c["filter"] == "H" else "D 128 taps"
        row = next(line for line in stdout.splitlines() if line.startswith(label))
        assert row.split()[-1] == f"{c['reference']['ms'] / c['dispatch']['ms']:.2f}x", row


@pytest.mark.distributed
def test_bench_cp(tmp_path):
    # L = 1024 over cp=2: zigzag chunks of 256 positions, longer than the D filter (128 taps), so
    # the state path sends a halo and the modal state instead of whole sequences.
    r, stdout = bench(tmp_path, "cp", "--cp", "2", "--d-model", "32", "--lengths", "1024", "--repeats", "1")
    assert sorted((x["layer"], x["path"]) for x in r["rows"]) == [("D", "all2all"), ("D", "state"), ("H", "all2all"),
                                                                 ("H", "state")]
    long_conv = {}
    for x in r["rows"]:
        assert x["L"] == 1024 and positive(x["ms"]), x
        assert x["bytes"] and all(positive(v) for v in x["bytes"].values()), x
        long_conv[x["layer"], x["path"]] = sum(v for k, v in x["bytes"].items() if k.startswith("long_conv/"))
    assert [(s["layer"], s["L"]) for s in r["summary"]] == [("D", 1024), ("H", 1024)]
    for s in r["summary"]:
        a, st = long_conv[s["layer"], "all2all"], long_conv[s["layer"], "state"]
        assert (s["all2all_bytes"], s["state_bytes"]) == (a, st) and a > 0 and st > 0
        assert s["ratio"] == pytest.approx(st / a, rel=1e-12)
        assert s["ratio"] < 1, s  # what the state path is for: less traffic than all-to-all
        assert f"1/{1 / s['ratio']:.0f}" in stdout


@pytest.mark.slow
def test_bench_train(tmp_path):
    r, _ = bench(tmp_path, "train", "--sizes", "tiny", "--lengths", "128", "--layouts", "1 proc", "--steps", "2",
                 "--global-batch", "1")
    assert r["bench"] == "train" and positive(r["cores"])
    (x,) = r["results"]
    assert (x["size"], x["L"], x["layout"]) == ("tiny", 128, "1 proc")
    assert positive(x["hyena_tokens_per_s"]) and positive(x["attention_tokens_per_s"])
    assert x["speedup"] == pytest.approx(x["hyena_tokens_per_s"] / x["attention_tokens_per_s"], rel=1e-12)


def test_bench_merge(tmp_path):
    r, _ = bench(tmp_path, "merge", "--d-model", "32", "--pattern", "SDH", "--local", "S", "--lengths", "256",
                 "--patchers", "none,static", "--repeats", "1", "--position-length", "256", "--train-seconds", "0.3",
                 "--train-d-model", "32", "--train-len", "64", "--train-batch", "2", "--threads", "1")
    rows = {x["model"]: x for x in r["throughput"]}
    assert list(rows) == ["none", "static"]
    for x in rows.values():
        assert x["L"] == 256 and positive(x["seconds"]) and finite(x["peak_mib"]) and positive(x["params"]), x
        assert x["bytes_per_s"] == pytest.approx(256 / x["seconds"], rel=1e-12)
        assert x["speedup"] == pytest.approx(rows["none"]["seconds"] / x["seconds"], rel=1e-12)
    assert rows["none"]["speedup"] == 1.0
    assert rows["static"]["mean_patch"] == 4.0 and rows["static"]["slots"] == 256 // 4  # static patches of 4
    pos = r["position"]
    assert pos["L"] == 256
    for kind, ref in (("sinusoid", "sinusoid"), ("ours", "sinusoid"), ("plain-merge", "plain-merge"),
                      ("bridge", "plain-merge")):
        x = pos[kind]
        assert positive(x["seconds"]) and finite(x["peak_mib"]), (kind, x)
        assert x["time_ratio"] == pytest.approx(x["seconds"] / pos[ref]["seconds"], rel=1e-12)
        assert x["memory_ratio"] == pytest.approx(x["peak_mib"] / max(pos[ref]["peak_mib"], 1e-9), rel=1e-12)
    runs = {x["model"]: x for x in r["training"]["runs"]}
    assert list(runs) == ["none", "static"]
    for x in runs.values():
        assert x["steps"] >= 1 and x["train_bytes"] == x["steps"] * 2 * 64, x
        assert positive(x["seconds"]) and x["cpu_seconds_per_thread"] >= 0.3, x
        assert positive(x["val_bits_per_base"]) and positive(x["params"]), x


def test_bench_generate(tmp_path):
    r, stdout = bench(tmp_path, "generate", "--pattern", "SDH*", "--d-model", "32", "--lengths", "32,64",
                      "--steps", "4", "--recompute-steps", "2", "--stream-pattern", "SDH",
                      "--stream-lengths", "2000,3000", "--chunk-size", "512", "--one-pass-max", "2000",
                      "--threads", "1")
    assert [x["prompt"] for x in r["decode"]] == [32, 64]
    for x in r["decode"]:
        assert all(positive(x[k]) for k in ("prefill_s", "cached_tok_s", "recompute_tok_s", "cache_mib")), x
        assert x["speedup"] == pytest.approx(x["cached_tok_s"] / x["recompute_tok_s"], rel=1e-12)
    assert f"{r['decode'][1]['cached_tok_s'] / r['decode'][0]['cached_tok_s']:.2f}x" in stdout
    # 3000 bases are over --one-pass-max: streamed only
    assert [(x["bases"], x["mode"]) for x in r["stream"]] == [(2000, "stream"), (2000, "one pass"), (3000, "stream")]
    assert "(does not fit: skipped)" in stdout
    for x in r["stream"]:
        assert positive(x["seconds"]) and finite(x["peak_mib"]) and positive(x["bits_per_base"]), x
    # streaming in chunks with the cache scores the same as the one-pass forward
    assert r["stream"][0]["bits_per_base"] == pytest.approx(r["stream"][1]["bits_per_base"], rel=1e-5)


# ---------------------------------------------------------------------------- demo


@pytest.mark.slow
@pytest.mark.distributed
def test_demo(tmp_path, capfd):
    """`make demo` at 2 steps: pack, train (2 processes, CP=2, ZeRO-1), convert --verify, eval on 16
    held-out windows, the summary table, summary.json and the loss curve."""
    out = tmp_path / "demo"
    rc, stdout, err = run_cli("demo", "--out", out, "--steps", "2", "--eval-windows", "16")
    steps = capfd.readouterr().out  # what the demo's child processes printed
    assert rc == 0, (steps + stdout + err)[-4000:]
    assert "verify: max |logit difference| single-device vs sharded" in steps and "(OK, tolerance" in steps
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in rows if "loss" in x]
    assert [x["step"] for x in train] == [1, 2] and summary["steps"] == 2
    assert train[-1]["tokens"] == 2 * 16 * 512  # 2 steps x configs/tiny.yaml's global batch 16 x 512
    assert all(positive(x["loss"]) and positive(x["tokens_per_s"]) for x in train)
    # mean tokens/s: the steps after the first
    assert summary["tokens_per_s"] == pytest.approx(train[1]["tokens_per_s"], rel=1e-12)
    ev = summary["eval"]
    assert ev["bases"] == 16 * 512 and ev["seq_len"] == 512
    assert positive(ev["loss"]) and ev["bits_per_base"] == pytest.approx(ev["loss"] / math.log(2), rel=1e-12)
    assert all(positive(summary["times"][k]) for k in ("pack", "train", "convert"))
    table = dict(line.strip("|").split("|")[:2] for line in stdout.splitlines() if line.startswith("| ") and
                 line.count("|") == 3)
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["steps"] == "2" and table["tokens"] == f"{2 * 16 * 512:,}"
    assert table["held-out bases"] == f"{16 * 512:,}"
    assert table["held-out bits/base (converted model)"] == f"{ev['bits_per_base']:.4f}"
    assert table["mean tokens/s"] == f"{summary['tokens_per_s']:,.0f}"
    first, last = train[0]["loss"] / 0.693147, train[-1]["loss"] / 0.693147
    assert table["train loss (bits/base), first -> last"] == f"{first:.3f} -> {last:.3f}"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "model.safetensors").is_file()
