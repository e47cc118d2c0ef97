"""`hyena-glt data stats [--verify]`, progress reporting, and `hyena-glt bench pack`."""

from __future__ import annotations

import io
import json

from conftest import run_cli
from support.data import manifest

from data_tools.progress import Progress


def test_stats_and_verify(tmp_path, lambda_phage, nmasked_contig):
    out = tmp_path / "out"
    rc, _, err = run_cli("pack", lambda_phage, nmasked_contig, "--out", out, "--seq-len", "4000",
                         "--shard-size-mb", "0.1", "--val-fraction", "0", "--progress", "none")
    assert rc == 0, err
    m = manifest(out)
    rc, stdout, _ = run_cli("data", "stats", out, "--verify")
    assert rc == 0
    t = m["totals"]["train"]
    assert f"train  {t['shards']:>7} {t['samples']:>10}" in stdout
    assert f"{m['input_totals']['records']} records" in stdout
    assert f"dropped (n_fraction): {m['dropped']['n_fraction']['windows']} windows" in stdout
    assert f"verify: {len(m['shards'])}/{len(m['shards'])} shard(s) OK" in stdout

    first, second = m["shards"][0], m["shards"][1]
    with open(out / first["path"], "r+b") as f:  # flip one byte in the middle of a sequence
        f.seek(2000)
        b = f.read(1)
        f.seek(2000)
        f.write(bytes([b[0] ^ 0x20]))
    (out / second["path"]).unlink()
    rc, stdout, _ = run_cli("data", "stats", out, "--verify")
    assert rc == 1
    assert f"CORRUPT {first['path']}" in stdout and f"MISSING {second['path']}" in stdout
    rc, _, _ = run_cli("data", "stats", out)  # without --verify nothing is read but the manifest
    assert rc == 0


def test_progress_log_lines_and_bar():
    s = io.StringIO()
    p = Progress(10_000_000, "pack", mode="auto", every_s=0, stream=s)  # not a terminal -> log lines
    p.update(4_000_000)
    p.close()
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("pack: 4.0/10.0 Mbp (40%)") and "Mbp/s" in lines[0] and "ETA" in lines[0]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    t = Tty()
    bar = Progress(10_000_000, "pack", mode="auto", stream=t)
    bar.update(5_000_000)
    bar.close()
    shown = t.getvalue()  # bases done/total, rate (k/M/Gbp/s) and elapsed<ETA
    assert "5.00M/10.0M" in shown and "bp/s]" in shown and "00:00<" in shown


def test_bench_pack_reports_ratios(tmp_path):
    rc, stdout, _ = run_cli("bench", "pack", "--repeats", "2", "--copies", "1", "2", "--json", tmp_path / "b.json")
    assert rc == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert [c["copies"] for c in report["collections"]] == [1, 2]
    for c in report["collections"]:
        cases = [r["case"] for r in c["results"]]
        assert cases[0].startswith("read only") and "pack --workers 1" in cases and "pack --workers 2" in cases
        assert c["results"][0]["ratio_to_read"] == 1.0
        assert all(r["mbp_per_s"] > 0 and r["seconds"] > 0 for r in c["results"])
        by = {r["case"]: r for r in c["results"]}
        read = c["results"][0]
        for r in c["results"]:  # recomputed from the reported numbers, up to their rounding
            assert _near(r["mbp_per_s"], c["bases"] / r["seconds"] / 1e6, 0.05, r["mbp_per_s"] * 5e-5 / r["seconds"]), r
            # ratio to reading only: the ratio of the rates, the inverse ratio of the times (the same bases)
            assert _near(r["ratio_to_read"], r["mbp_per_s"] / read["mbp_per_s"], 5e-4,
                         r["ratio_to_read"] * (0.05 / r["mbp_per_s"] + 0.05 / read["mbp_per_s"])), (r, read)
            assert _near(r["ratio_to_read"], read["seconds"] / r["seconds"], 5e-4,
                         r["ratio_to_read"] * (5e-5 / r["seconds"] + 5e-5 / read["seconds"])), (r, read)
        two = by["pack --workers 2"]
        assert two["speedup_over_1_worker"] > 0 and two["paired_speedup_over_1_worker"] > 0
        one = by["pack --workers 1"]
        assert _near(two["speedup_over_1_worker"], one["seconds"] / two["seconds"], 5e-4,
                     two["speedup_over_1_worker"] * (5e-5 / one["seconds"] + 5e-5 / two["seconds"])), (one, two)
        # Timed as `hyena-glt pack` runs (no torch), and the workers made the same pack.
        assert c["timed_without_torch"] and c["same_output_for_every_worker_count"]
    assert len(report["collections"][1]["files"]) == 6
    assert report["collections"][1]["inputs"].startswith("6 file(s): 2 copies of")


def _near(reported: float, recomputed: float, rounded: float, inputs_rounded: float) -> bool:
    """`reported` is `recomputed` rounded to +-`rounded`, give or take what rounding the numbers it is
    recomputed from moves it (`inputs_rounded`)."""
    return abs(reported - recomputed) <= rounded + inputs_rounded + 1e-12
