"""`hyena-glt data stats DIR [--verify]`: a pack's totals, and a check of every shard."""

from __future__ import annotations

import sys
from pathlib import Path

from .manifest import load_manifest
from .shards import sha256_file


def verify_shards(out: str | Path, manifest: dict) -> list[str]:
    """One line per shard or index that is missing or whose sha256 differs."""
    problems = []
    for s in manifest["shards"]:
        for name, digest in ((s["path"], s["sha256"]), (s["index"], s["index_sha256"])):
            p = Path(out) / name
            if not p.exists():
                problems.append(f"MISSING {name}")
            elif sha256_file(p) != digest:
                problems.append(f"CORRUPT {name} (sha256 differs from the manifest)")
    return problems


def print_stats(out: str, verify: bool = False, stream=None) -> int:
    """Exit code: 1 if --verify found a corrupt or missing file, else 0."""
    stream = stream or sys.stdout
    m = load_manifest(out)
    o = m["options"]
    it = m["input_totals"]
    w = m["windows"]
    p = lambda *a: print(*a, file=stream)  # noqa: E731
    p(f"pack {out}: {it['files']} input file(s), {it['records']} records, {it['bases'] / 1e6:.3f} Mbp; {m['num_jobs']} job(s)")
    p(f"options: seq_len {o['seq_len']}, stride {o['stride']}, reverse_complement {o['reverse_complement']}, "
      f"max_n_fraction {o['max_n_fraction']}, min_len {o['min_len']}, val {o['val_fraction']}, test {o['test_fraction']}, seed {o['seed']}")
    h = m.get("holdout")
    if h and h["mode"] == "position":
        p(f"hold-out: by position, a block of {o['val_fraction']} (val) / {o['test_fraction']} (test) of each record's "
          f"windows; {h['overlap_windows']} window(s) each side of a block dropped")
    elif h:
        r = h["val_regions"]
        missing = f", {len(r['records_not_found'])} not in the inputs" if r["records_not_found"] else ""
        p(f"hold-out: val = windows overlapping {r['path']} ({r['intervals']} intervals, {r['bases']} bases on "
          f"{r['records']} records{missing}); {h['overlap_windows']} window(s) each side dropped")
    p(f"{'split':<6} {'shards':>7} {'samples':>10} {'windows':>10} {'records':>8} {'Mbp':>10}")
    for split, t in m["totals"].items():
        p(f"{split:<6} {t['shards']:>7} {t['samples']:>10} {t['windows']:>10} {t['records']:>8} {t['bases'] / 1e6:>10.3f}")
    p(f"windows: {w['planned']['windows']} planned = {w['kept']['windows']} kept + {w['dropped']['windows']} dropped")
    for reason, d in m["dropped"].items():
        if any(d.values()):
            detail = f"{d['windows']} windows, {d['bases']} bases" if "windows" in d else f"{d['records']} records"
            p(f"dropped ({reason}): {detail}")
    for s in m["skipped_files"]:
        p(f"SKIPPED {s['path']}: {s['reason']}")
    rc = 0
    if verify:
        problems = verify_shards(out, m)
        for line in problems:
            p(line)
        n = len(m["shards"])
        p(f"verify: {n - len({x.split()[1].rsplit('.', 1)[0] for x in problems})}/{n} shard(s) OK"
          + (f", {len(problems)} problem(s)" if problems else ""))
        rc = 1 if problems else rc
    return rc
