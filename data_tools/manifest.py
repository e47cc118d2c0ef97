"""Per-job manifests and the merged `DIR/manifest.json`.

Each job writes `DIR/.pack/job-NNNNN.json` when it is done. Whoever sees all of them
agree (same options, same input list) merges them: the last job to finish, or
`hyena-glt pack --finalize DIR`. Merging is a pure function of the job manifests and the
result is written atomically, so two jobs racing to merge write the same bytes. Under
mpiexec rank 0 merges the job manifests gathered over MPI instead (`write_merged`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .shards import atomic_write

FORMAT = "hyena-glt-pack/1"
MANIFEST = "manifest.json"
STATE_DIR = ".pack"


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def job_manifest_path(out: Path, job: int) -> Path:
    return state_dir(out) / f"job-{job:05d}.json"


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
            missing = f" ({reason or 'jobs ' + ', '.join(map(str, missing_jobs)) + ' have not finished'})"
        raise FileNotFoundError(f"{path} not found: not a finished pack{missing}")
    try:
        manifest = json.loads(path.read_bytes())
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


def check_manifest(manifest: dict, path: Path) -> None:
    """ValueError naming `path` and the first missing key (or entry of the wrong type)."""
    def need(obj, keys, where: str) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: damaged manifest: {where or 'the top level'} is not an object")
        for k in keys:
            if k not in obj:
                raise ValueError(f"{path}: damaged manifest: missing key {where + '.' if where else ''}{k}")

    need(manifest, _REQUIRED, "")
    need(manifest["options"], _REQUIRED_OPTIONS, "options")
    need(manifest["input_totals"], ("files", "records", "bases"), "input_totals")
    need(manifest["windows"], ("planned", "kept", "dropped"), "windows")
    for k in ("planned", "kept", "dropped"):
        need(manifest["windows"][k], ("windows",), f"windows.{k}")
    need(manifest["totals"], (), "totals")
    for split, t in manifest["totals"].items():
        need(t, ("shards", "samples", "windows", "records", "bases"), f"totals.{split}")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: damaged manifest: shards is not a list")
    for i, shard in enumerate(manifest["shards"]):
        need(shard, _REQUIRED_SHARD, f"shards[{i}]")


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
    return {
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


def try_finalize(out: Path, require: bool = False) -> dict | None:
    """Merge the job manifests into DIR/manifest.json if every job is done. Returns the
    merged manifest, or None (or raises ValueError when `require`) if it cannot be made."""
    out = Path(out)
    jobs, missing, reason = _collect(out)
    if reason is None and missing:
        reason = f"jobs {', '.join(map(str, missing))} of {jobs[0]['num_jobs']} have not finished"
    if reason:
        if require:
            raise ValueError(f"{out}: cannot finalize: {reason}")
        return None
    return _write(out, jobs)


def write_merged(out: Path, jobs: list[dict]) -> dict:
    """Merge the manifests of all of a pack's jobs, given in job order (as gathered over
    MPI), into DIR/manifest.json, without looking for job manifests on disk."""
    reason = _disagreement(jobs)
    if reason is None and [j["job_index"] for j in jobs] != list(range(jobs[0]["num_jobs"])):
        reason = f"got the manifests of jobs {[j['job_index'] for j in jobs]}, not of jobs 0-{jobs[0]['num_jobs'] - 1}"
    if reason:
        raise ValueError(f"{out}: cannot merge the job manifests: {reason}")
    return _write(Path(out), jobs)


def _write(out: Path, jobs: list[dict]) -> dict:
    merged = merge(jobs)
    atomic_write(out / MANIFEST, dumps(merged))
    return merged
