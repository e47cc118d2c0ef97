"""Packing with `--workers` processes: each worker packs whole files (`_worker`), the job
hands files out, passes each file's handover on and completes the shards that span files
(`pack_with_workers`). Workers are forked: nothing pack imports loads torch."""

from __future__ import annotations

from collections import deque
from multiprocessing import get_context
from multiprocessing.connection import wait

from ..fasta import BadInputError
from ..holdout import BadRegionsError
from ..shards import ResumeMismatch, ShardIO
from ..tracks import BadTrackError
from .books import JobBooks
from .file_pass import FilePass, Handover, PackContext, SkipFile
from .options import PackOptions
from .shared_hashes import SharedShardHashes


def _ahead_bases(opts: PackOptions) -> int:
    """Bases of its file a worker may read (and check) before the files ahead of it are
    planned: whole typical genome files, and never more than a few shards' worth."""
    return max(64_000_000, 2 * int(opts.shard_size_mb * 1e6))


_PROGRESS_EVERY = 8_000_000  # bases between a worker's progress messages
_WRITE_STEP = 2_000_000  # bases a worker writes (~2 ms) between looks at its messages


def _worker(conn, ctx: PackContext) -> None:
    """A worker process. It packs the files it is handed, in order, and completes the shards
    of one file that the job hands back once they are closed (it hashed them as it wrote
    them). What it does next, in this order:

    1. plan its first unplanned file once that file's handover has come and the file is
       read (or the read-ahead budget is spent: then the rest of it is planned and written
       as it is read), and read that file when its handover has come: every other worker
       may be waiting for this plan;
    2. read its first unplanned file before its handover comes, so that the plan moves on
       as soon as it does;
    3. write what it planned, a little at a time (a plan that arrives in between is made
       at once: planning never waits for writing);
    4. read ahead the files after it (up to `_ahead_bases` bases held), stopping as soon
       as a message comes;
    5. with nothing else to do, ask the job for another file: asking only when idle keeps
       a busy worker from taking files that an idle one could pack."""
    shard_io = ShardIO(ctx.out)
    queue: deque[tuple[int, FilePass]] = deque()  # (position, pass) of the files handed to it, not yet planned
    writing: deque[tuple[int, FilePass]] = deque()  # planned, not yet all written
    handovers: dict[int, Handover] = {}
    budget = _ahead_bases(ctx.opts)
    unreported, asked = 0, False

    def progress(n: int) -> None:
        nonlocal unreported
        unreported += n
        if unreported >= _PROGRESS_EVERY:
            conn.send(("progress", None, unreported))
            unreported = 0

    def handle(msg) -> None:
        nonlocal asked
        if msg is None:
            raise _Stop
        kind, pos, payload = msg
        if kind == "file":
            queue.append((pos, FilePass(ctx, payload, shard_io, progress)))
            asked = False
        elif kind == "handover":
            handovers[pos] = payload
        elif kind == "complete":
            conn.send(("completed", None, [(s, shard_io.commit(s)) for s in payload]))

    def write(max_bases: int | None) -> None:
        nonlocal unreported, asked
        pos, file_pass = writing[0]
        if not file_pass.write(max_bases):
            if file_pass.writing is not None:
                w = file_pass.writing
                conn.send(("landed", pos, (w.name, w.landed())))
        else:
            writing.popleft()
            done = file_pass.complete()
            shard_io.release()  # so that any process can complete the shards this file shares
            if not (queue or writing or asked):
                # Idle from now on: ask first, so the job hands out a file before it does the
                # books of this one.
                conn.send(("more", None, None))
                asked = True
            conn.send(("progress", None, unreported))
            unreported = 0
            conn.send(("written", pos, done))

    try:
        while True:
            while conn.poll():
                handle(conn.recv())
            held = sum(p.held_bases for _, p in queue)
            head = queue[0][1] if queue else None
            ready = head is not None and queue[0][0] in handovers
            unread = next((p for _, p in queue if not p.read_done), None)
            if ready and (head.read_done or held >= budget):
                if not head.read_done:  # planned as it is read, and written at once: write in file order
                    while writing:
                        write(None)
                pos, file_pass = queue.popleft()
                file_pass.plan_file(handovers.pop(pos), lambda s, plan: conn.send(("planned", pos, (s, plan))))
                writing.append((pos, file_pass))
            elif head is not None and not head.read_done and held < budget:
                head.read_ahead(budget - held, bool if ready else conn.poll)
            elif writing:
                write(_WRITE_STEP)
            elif unread is not None and held < budget:
                unread.read_ahead(budget - held, conn.poll)
            elif not asked and unread is None and held < budget:
                conn.send(("more", None, None))
                asked = True
            else:
                handle(conn.recv())
    except _Stop:
        pass
    except SkipFile as e:
        conn.send(("skip", None, (e.index, e.check)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the job, which stops
        if not isinstance(e, (BadInputError, BadTrackError, BadRegionsError, OSError, ResumeMismatch)):
            import traceback

            e = RuntimeError(f"pack worker failed: {traceback.format_exc()}")
        try:
            conn.send(("error", None, e))
        except OSError:
            pass


class _Stop(Exception):
    """The job has no more work for this worker."""


def pack_with_workers(ctx: PackContext, mine: list[int], job: JobBooks, procs: list) -> None:
    """Hands the files out in order to workers that ask, passes each file's handover on to
    the worker of the next file, and completes the shards spanning files once all their
    files are written (`SharedShardHashes` hashes them meanwhile).

    A worker asks for a file when it is idle, which it also is while it waits for a
    handover: reading files ahead is then all it can do, but every file it reads it will
    also write. So a worker gets a file only while no other worker has less work handed out
    and not yet written; otherwise its request waits until that changes. Without this, a
    worker waiting behind a large file would read (and then have to write) all the files
    after it while the others have nothing left to do."""
    conns = [c for c, _ in procs]
    owner = {pos: conn for pos, conn in enumerate(conns)}  # position in `mine` -> its worker
    waiting: dict[int, Handover] = {}  # handovers for files not handed out yet
    nxt, written, outstanding = len(conns), 0, 0  # outstanding: shards handed back, not yet completed
    load = {conn: job.estimates[mine[pos]] for pos, conn in owner.items()}  # bases handed out, not yet written
    asking: list = []  # workers whose request for a file waits
    hashes = SharedShardHashes(ctx.out, job.written)
    shard_io = ShardIO(ctx.out)

    def hand_out() -> None:
        nonlocal nxt
        for conn in list(asking):
            if nxt == len(mine):
                asking.clear()
                return
            if load[conn] <= min(load[c] for c in conns if c is not conn):
                asking.remove(conn)
                conn.send(("file", nxt, mine[nxt]))
                owner[nxt] = conn
                load[conn] += job.estimates[mine[nxt]]
                if nxt in waiting:
                    conn.send(("handover", nxt, waiting.pop(nxt)))
                nxt += 1

    def complete(shards) -> None:
        """Complete shards whose files are all written: a shard of one file by the worker that
        wrote it (which hashed it as it wrote), a shard of several files here."""
        nonlocal outstanding
        for shard in shards:
            contributors = job.contributors[shard.name]
            if len(contributors) == 1:
                owner[next(iter(contributors))].send(("complete", None, [shard]))
                outstanding += 1
            else:
                job.completed(shard, shard_io.commit(shard, hashes.take(shard)))

    while written < len(mine) or outstanding:
        ready = wait(conns, timeout=0 if hashes.todo else None)
        if not ready:
            hashes.step()
        for conn in ready:
            try:
                kind, pos, payload = conn.recv()
            except EOFError:
                raise RuntimeError("a pack worker process died") from None
            if kind == "progress":
                job.progress.update(payload)
            elif kind == "planned":
                state, plan = payload
                job.planned(pos, plan)
                hashes.planned(pos, plan)
                if pos + 1 == len(mine):
                    job.close(s for s in state.open.values() if s is not None)
                    complete(job.take_ready())
                elif pos + 1 in owner:
                    owner[pos + 1].send(("handover", pos + 1, state))
                else:
                    waiting[pos + 1] = state
            elif kind == "written":
                load[conn] -= job.estimates[mine[pos]]
                hand_out()
                for shard, entry in payload:
                    job.completed(shard, entry)
                written += 1
                done = job.wrote(pos)
                hashes.wrote(job.touched_by.get(pos, ()))
                complete(done)
            elif kind == "landed":
                hashes.landed(pos, *payload)
            elif kind == "completed":
                for shard, entry in payload:
                    job.completed(shard, entry)
                outstanding -= len(payload)
            elif kind == "more":
                asking.append(conn)
                hand_out()
            elif kind == "skip":
                raise SkipFile(*payload)
            else:
                raise payload


def start_workers(ctx: PackContext, mine: list[int], n: int) -> list:
    """Fork `n` workers, each handed its first file at once, so the first starts reading
    while the next is forked (~3 ms each here; nothing pack imports loads torch, which
    would make it several times dearer)."""
    mp = get_context("fork")
    procs = []
    for pos in range(n):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_worker, args=(child, ctx), daemon=True)
        proc.start()
        child.close()
        parent.send(("file", pos, mine[pos]))
        if pos == 0:
            parent.send(("handover", 0, Handover.start(ctx.opts.num_jobs)))
        procs.append((parent, proc))
    return procs


def stop_workers(procs: list, failed: bool) -> None:
    """Tell the workers to exit. After a success they hold nothing open and are not waited
    for (their exit, a few ms each, overlaps the job's last steps); after a failure they
    may be blocked on a handover that never comes, and are ended."""
    for conn, proc in procs:
        try:
            conn.send(None)
        except OSError:
            pass
        conn.close()
        if failed:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
