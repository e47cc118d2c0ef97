"""Per-job manifests and the merged `DIR/manifest.json`.

Each job writes `DIR/.pack/job-NNNNN.json` when it is done. Whoever sees all of them
agree (same options, same input list) merges them: the last job to finish, or
`hyena-glt pack --finalize DIR`. Merging is a pure function of the job manifests and the
result is written atomically (a temporary file renamed into place). Under mpiexec rank 0
merges the job manifests gathered over MPI instead (`write_merged`).

What the jobs of a pack share (`options.json`, `manifest.json`) is changed only under the
pack's state lock, `DIR/.pack/LOCK` (`state_lock`), held for a moment: to check the options
and, as a job starts, to remove `manifest.json` and that job's manifest (data_tools/pack/
lock.py: `start_jobs`); to merge. So two mergers never interleave, and a merge never reads a
job manifest that a job starting again is about to remove: a job killed at any moment leaves
the old complete output or no `manifest.json` at all. Each job's own files are under its job
lock (data_tools/pack/lock.py).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .dirlock import DirLock
from .holdout import EmptySplitError, empty_splits, merge_holdout
from .shards import atomic_write

FORMAT = "hyena-glt-pack/1"
MANIFEST = "manifest.json"
STATE_DIR = ".pack"
STATE_LOCK = "LOCK"
STATE_LOCK_WAIT_S = 60.0  # it is held for a moment (a merge: well under a second); a live holder is waited for


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def job_manifest_path(out: Path, job: int) -> Path:
    return state_dir(out) / f"job-{job:05d}.json"


def state_lock(out: Path, log=None) -> DirLock:
    """The pack's state lock (`DIR/.pack/LOCK`), taken: waits up to STATE_LOCK_WAIT_S for a live
    holder, takes over a stale one (said through `log`, default stderr). Use as `with
    state_lock(out): ...`."""
    out = Path(out)
    if log is None:
        def log(message: str) -> None:
            print(f"pack: {message}", file=sys.stderr, flush=True)
    return DirLock(out, state_dir(out) / STATE_LOCK, "--out", f"--out {out}").acquire(log, wait=STATE_LOCK_WAIT_S)


def remove_shared_temporaries(out: Path) -> None:
    """The temporary files of writes to manifest.json and options.json that a killed process
    left. Only under the state lock: no other process is writing them then."""
    out = Path(out)
    for p in (*out.glob(f".{MANIFEST}.*.tmp"), *state_dir(out).glob(".options.json.*.tmp")):
        p.unlink(missing_ok=True)


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_job_manifest(out: Path, job: int, data: dict) -> None:
    atomic_write(job_manifest_path(out, job), dumps(data))


def load_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        missing = ""
        if state_dir(out).is_dir():
            _, missing_jobs, reason = _collect(Path(out))
            if reason is None and not missing_jobs:
                reason = ("every job finished, but manifest.json was not written (a split the pack was asked for "
                          f"is empty?); hyena-glt pack --finalize {out} writes it or says why")
            missing = f" ({reason or 'jobs ' + ', '.join(map(str, missing_jobs)) + ' have not finished'})"
        raise FileNotFoundError(f"{path} not found: not a finished pack{missing}")
    try:
        manifest = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: unknown manifest format {found!r} (expected {FORMAT})")
    check_manifest(manifest, path)
    return manifest


# What readers of manifest.json rely on (the loaders, `data stats`): checked on load, so a
# damaged manifest is one error naming the file and the key rather than a KeyError later.
_REQUIRED = ("num_jobs", "options", "inputs", "input_totals", "shards", "totals", "windows", "dropped", "skipped_files")
_REQUIRED_OPTIONS = ("seq_len", "stride", "reverse_complement", "max_n_fraction", "min_len", "val_fraction",
                     "test_fraction", "seed")
_REQUIRED_SHARD = ("path", "split", "samples", "bases", "bytes", "sha256", "index", "index_sha256")


_COUNTS_MAX = 2**63 - 1  # counts are read into int64 arrays


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows (a damaged file)")


def check_manifest(manifest: dict, path: Path) -> None:
    """ValueError naming `path` and the first missing key or value of the wrong type or range
    (what the readers of manifest.json rely on: the loaders, `data stats`, the split checks)."""
    def bad(where: str, what: str, value) -> ValueError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ValueError(f"{path}: damaged manifest: {where}: expected {what}, got {shown}")

    def need(obj, keys, where: str) -> dict:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: damaged manifest: {where or 'the top level'} is not an object")
        for k in keys:
            if k not in obj:
                raise ValueError(f"{path}: damaged manifest: missing key {where + '.' if where else ''}{k}")
        return obj

    def count(obj: dict, key: str, where: str, low: int = 0) -> None:
        v = obj[key]
        if type(v) is not int or not low <= v <= _COUNTS_MAX:
            raise bad(f"{where}.{key}" if where else key, f"a whole number >= {low}", v)

    def number(obj: dict, key: str, where: str, low: float, high: float) -> None:
        v = obj[key]
        if type(v) not in (int, float) or not low <= v <= high:
            raise bad(f"{where}.{key}", f"a number in [{low:g}, {high:g}]", v)

    def text(obj: dict, key: str, where: str) -> None:
        if not isinstance(obj[key], str):
            raise bad(f"{where}.{key}" if where else key, "a string", obj[key])

    def listed(obj: dict, key: str, where: str) -> list:
        if not isinstance(obj[key], list):
            raise bad(f"{where}.{key}" if where else key, "a list", obj[key])
        return obj[key]

    need(manifest, _REQUIRED, "")
    count(manifest, "num_jobs", "", 1)
    o = need(manifest["options"], _REQUIRED_OPTIONS, "options")
    for k in ("seq_len", "stride"):
        count(o, k, "options", 1)
    count(o, "min_len", "options")
    if type(o["seed"]) is not int:
        raise bad("options.seed", "a whole number", o["seed"])
    for k in ("max_n_fraction", "val_fraction", "test_fraction"):
        number(o, k, "options", 0, 1)
    text(o, "reverse_complement", "options")
    for k in ("conservation", "val_regions"):  # optional: an object when present
        if o.get(k) is not None and not isinstance(o[k], dict):
            raise bad(f"options.{k}", "an object or null", o[k])
    if o.get("val_regions") is not None:
        text(need(o["val_regions"], ("path",), "options.val_regions"), "path", "options.val_regions")
    if "split_by" in o:
        text(o, "split_by", "options")
    t = need(manifest["input_totals"], ("files", "records", "bases"), "input_totals")
    for k in ("files", "records", "bases"):
        count(t, k, "input_totals")
    listed(manifest, "inputs", "")
    w = need(manifest["windows"], ("planned", "kept", "dropped"), "windows")
    for k in ("planned", "kept", "dropped"):
        count(need(w[k], ("windows",), f"windows.{k}"), "windows", f"windows.{k}")
    for split, t in need(manifest["totals"], (), "totals").items():
        for k in ("shards", "samples", "windows", "records", "bases"):
            count(need(t, ("shards", "samples", "windows", "records", "bases"), f"totals.{split}"), k, f"totals.{split}")
    for reason, d in need(manifest["dropped"], (), "dropped").items():
        keys = ("windows", "bases") if isinstance(d, dict) and "windows" in d else ("records",)
        for k in keys:
            count(need(d, keys, f"dropped.{reason}"), k, f"dropped.{reason}")
    for i, f in enumerate(listed(manifest, "skipped_files", "")):
        need(f, ("path", "reason"), f"skipped_files[{i}]")
    for i, shard in enumerate(listed(manifest, "shards", "")):
        where = f"shards[{i}]"
        need(shard, _REQUIRED_SHARD, where)
        for k in ("path", "split", "sha256", "index", "index_sha256"):
            text(shard, k, where)
        for k in ("samples", "bases", "bytes"):
            count(shard, k, where)
    h = manifest.get("holdout")
    if h is not None:  # `--split-by position` or `--val-regions` (holdout.job_holdout)
        need(h, ("mode", "overlap_windows"), "holdout")
        count(h, "overlap_windows", "holdout")
        if h["mode"] != "position":
            r = need(h, ("val_regions",), "holdout")["val_regions"]
            need(r, ("path", "records", "intervals", "bases", "records_not_found"), "holdout.val_regions")
            for k in ("records", "intervals", "bases"):
                count(r, k, "holdout.val_regions")
            listed(r, "records_not_found", "holdout.val_regions")


_JOB_KEYS = ("job_index", "num_jobs", "options", "input_list", "inputs", "shards", "windows", "dropped",
             "kept_windows", "records")


def _load_job(path: Path) -> dict:
    try:
        job = json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun that job") from None
    if not isinstance(job, dict):
        raise ValueError(f"{path}: damaged job manifest (not an object); delete it and rerun that job")
    missing = [k for k in _JOB_KEYS if k not in job]
    if missing:
        raise ValueError(f"{path}: damaged job manifest: missing key {missing[0]}; delete it and rerun that job")
    return job


def _collect(out: Path) -> tuple[list[dict], list[int], str | None]:
    """The job manifests present, the job indices missing, and why they cannot be merged."""
    found = sorted(state_dir(out).glob("job-*.json"))
    if not found:
        return [], [], "no job has finished"
    jobs = [_load_job(p) for p in found]
    reason = _disagreement(jobs)
    if reason:
        return jobs, [], reason
    num_jobs = jobs[0]["num_jobs"]
    have = {j["job_index"] for j in jobs}
    return [j for j in jobs if j["job_index"] < num_jobs], sorted(set(range(num_jobs)) - have), None


def _disagreement(jobs: list[dict]) -> str | None:
    """Why these job manifests are not parts of one pack, or None."""
    first = jobs[0]
    for j in jobs[1:]:
        if (j["num_jobs"], j["options"], j["input_list"]) != (first["num_jobs"], first["options"], first["input_list"]):
            return (f"job {j['job_index']} ran with other options or inputs than job {first['job_index']}; "
                    "rerun all jobs into an empty --out")
    return None


def _add(into: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def merge(jobs: list[dict]) -> dict:
    first = jobs[0]
    inputs: dict[str, dict] = {}
    for j in jobs:
        for entry in j["inputs"]:
            seen = inputs.setdefault(entry["path"], entry)
            if seen != entry:
                raise ValueError(f"{entry['path']}: jobs disagree about this input (it changed while packing?)")
    order = {e["path"]: i for i, e in enumerate(first["input_list"])}
    inputs_list = sorted(inputs.values(), key=lambda e: order[e["path"]])
    shards = sorted((s for j in jobs for s in j["shards"]), key=lambda s: s["path"])
    totals: dict = defaultdict(lambda: {"shards": 0, "samples": 0, "bases": 0, "windows": 0, "records": 0})
    for s in shards:
        t = totals[s["split"]]
        t["shards"] += 1
        t["samples"] += s["samples"]
        t["bases"] += s["bases"]
    windows: dict = {}
    dropped: dict = {}
    for j in jobs:
        _add(windows, j["windows"])
        _add(dropped, j["dropped"])
        for split, n in j["kept_windows"].items():
            totals[split]["windows"] += n
        for split, n in j["records"].items():
            totals[split]["records"] += n
    ok = [e for e in inputs_list if e["status"] == "ok"]
    merged = {
        "format": FORMAT,
        "num_jobs": first["num_jobs"],
        "options": first["options"],
        "inputs": inputs_list,
        "input_totals": {"files": len(ok), "records": sum(e["records"] for e in ok), "bases": sum(e["bases"] for e in ok)},
        "skipped_files": [{"path": e["path"], "reason": e["error"]} for e in inputs_list if e["status"] != "ok"],
        "shards": shards,
        "totals": dict(sorted(totals.items())),
        "windows": windows,
        "dropped": dropped,
    }
    holdouts = [j["holdout"] for j in jobs if j.get("holdout")]
    if holdouts:  # part of records held out (absent otherwise, so such packs keep their bytes)
        merged["holdout"] = merge_holdout(holdouts)
    return merged


def refusal(merged: dict, jobs: list[dict]) -> str | None:
    """Why manifest.json must not be written (a split the jobs were asked for on their
    command line is empty: `holdout.empty_splits`), or None."""
    if not any(j.get("empty_split") == "refuse" for j in jobs):
        return None
    problems = empty_splits(merged)
    if not problems:
        return None
    return ("; ".join(problems) + "; so manifest.json was not written: rerun into an empty --out, or add "
            "--allow-empty-split to this command to write it anyway")


def try_finalize(out: Path, require: bool = False, allow_empty_split: bool = False) -> dict | None:
    """Merge the job manifests into DIR/manifest.json if every job is done. Returns the
    merged manifest, or None (or raises ValueError when `require`) if it cannot be made.
    EmptySplitError if a split the jobs were asked for is empty (`refusal`), unless
    `allow_empty_split`."""
    out = Path(out)
    if not state_dir(out).is_dir():  # not a pack: nothing to lock
        jobs, missing, reason = _collect(out)
        if require:
            raise ValueError(f"{out}: cannot finalize: {reason}")
        return None
    with state_lock(out):  # one merger at a time, never beside a job starting again
        jobs, missing, reason = _collect(out)
        if reason is None and missing:
            reason = f"jobs {', '.join(map(str, missing))} of {jobs[0]['num_jobs']} have not finished"
        if reason:
            if require:
                raise ValueError(f"{out}: cannot finalize: {reason}")
            return None
        return _write(out, jobs, allow_empty_split)


def write_merged(out: Path, jobs: list[dict]) -> dict:
    """Merge the manifests of all of a pack's jobs, given in job order (as gathered over
    MPI), into DIR/manifest.json, without looking for job manifests on disk."""
    reason = _disagreement(jobs)
    if reason is None and [j["job_index"] for j in jobs] != list(range(jobs[0]["num_jobs"])):
        reason = f"got the manifests of jobs {[j['job_index'] for j in jobs]}, not of jobs 0-{jobs[0]['num_jobs'] - 1}"
    if reason:
        raise ValueError(f"{out}: cannot merge the job manifests: {reason}")
    with state_lock(out):
        return _write(Path(out), jobs)


def _write(out: Path, jobs: list[dict], allow_empty_split: bool = False) -> dict:
    merged = merge(jobs)
    reason = None if allow_empty_split else refusal(merged, jobs)
    if reason:
        raise EmptySplitError(reason)
    remove_shared_temporaries(out)
    atomic_write(out / MANIFEST, dumps(merged))
    return merged
