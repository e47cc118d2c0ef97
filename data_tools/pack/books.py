"""The job's books, kept in the job's main process (`JobBooks`): every file's plan in file
order, which files went into which shard, when a shard can be completed, its completion
record, and the counters the manifest reports."""

from __future__ import annotations

from pathlib import Path

from ..fasta import FileCheck
from ..progress import Progress
from ..shards import CompletionLog, ResumeMismatch, ShardFile, completion_record
from .file_pass import FilePlan, add_counters, new_counters


class JobBooks:
    """The job's books, kept in the main process: the files' plans in file order, who
    contributed to which shard, which shards can be completed when, completion records."""

    def __init__(self, files: list[Path], log: CompletionLog, estimates: dict[int, int], progress: Progress,
                 written_here: set[str], desc: str):
        self.files, self.log, self.estimates, self.progress, self.desc = files, log, estimates, progress, desc
        self.written_here = written_here  # shards written by this run (in any attempt)
        self.inputs: list[dict] = []
        self.entries: dict[str, dict] = {}
        self.records: dict[str, bytes] = {}  # completion record of every shard completed or kept
        self.shard_inputs: dict[str, dict[str, str]] = {}  # shard -> {source: sha256}
        self.counters = new_counters()
        self.regions_seen: set[str] = set()  # records of --val-regions found in the job's files
        self.bad: dict[int, FileCheck] = {}
        self.resumed = 0
        self.written: set[int] = set()  # files whose writes are all on disk
        self.touched_by: dict[int, list[str]] = {}
        self.contributors: dict[str, set[int]] = {}
        self.waiting: dict[str, tuple[ShardFile, set[int]]] = {}  # closed shards, files not yet written
        self.ready: list[ShardFile] = []  # closed, every file written, not yet handed to anyone

    def planned(self, pos: int, plan: FilePlan) -> None:
        c, source = plan.check, str(self.files[plan.index])
        entry = {"path": source, "status": "ok", "error": None, "size": c.size, "sha256": c.sha256,
                 "compression": c.compression, "records": c.records, "bases": c.bases}
        self.touched_by[pos] = plan.touched
        if not plan.ok:
            self.bad[plan.index] = c
            self.progress.write(f"warning: skipping {source}: {c.error}")
            self.inputs.append({**entry, "records": 0, "bases": 0, "status": "skipped", "error": c.error})
            return
        for w in plan.warnings:
            self.progress.write(w)
        for name in plan.touched:
            inputs = self.shard_inputs.setdefault(name, {})
            inputs[source] = c.sha256
            inputs.update(plan.track_sha)  # a changed track must not let a resumed job keep the shard
            self.contributors.setdefault(name, set()).add(pos)
        # A shard only this file contributed to is completed by the file's own pass.
        self.close(s for s in plan.closed if self.contributors[s.name] != {pos})
        add_counters(self.counters, plan.counters)
        self.regions_seen.update(plan.regions_seen)
        self.progress.set_total(self.progress.total - self.estimates[plan.index] + c.bases)
        self.inputs.append(entry)

    def close(self, shards) -> None:
        """`shards` get no more samples: each can be completed once every file in it is
        written."""
        for shard in shards:
            missing = self.contributors[shard.name] - self.written
            if missing:
                self.waiting[shard.name] = (shard, missing)
            else:
                self.ready.append(shard)

    def wrote(self, pos: int) -> list[ShardFile]:
        """Everything of file `pos` is on disk: the shards that can be completed now."""
        self.written.add(pos)
        for name in self.touched_by.get(pos, ()):
            if name in self.waiting:
                shard, missing = self.waiting[name]
                missing.discard(pos)
                if not missing:
                    del self.waiting[name]
                    self.ready.append(shard)
        return self.take_ready()

    def take_ready(self) -> list[ShardFile]:
        ready, self.ready = self.ready, []
        return ready

    def completed(self, shard: ShardFile, entry: dict) -> None:
        inputs = self.shard_inputs[shard.name]
        record = completion_record(shard, entry, inputs)
        if shard.kept is not None:
            if shard.kept["inputs"] != inputs:
                raise ResumeMismatch(f"{shard.name}: the earlier run's shard was made from other inputs")
            self.resumed += shard.name not in self.written_here
        else:
            self.log.append(record)
            self.written_here.add(shard.name)
        self.entries[shard.name] = entry
        self.records[shard.name] = record
