"""Outputs published whole: what `convert`, `reshard`, `import-evo2`, `export-vortex` and
`finetune` write appears only once it is complete, under the same lock as a checkpoint.dir.

For an output OUT (a directory, or for `export-vortex` the pair OUT.pt + OUT.yml):

* **Lock.** `OUT.LOCK`, a sibling file (OUT itself is renamed into place, so the lock cannot
  live inside it): DirLock's rules (host, PID and start time; a lock whose process is gone is
  taken over and said so; a live one refuses the command in one line).
* **Tidy.** What an interrupted run left next to OUT is cleared first, under the lock (see
  `recover`): `OUT.partial-XXXXXXXX` (an unfinished new output) is removed;
  `OUT.replaced-XXXXXXXX` (the previous output, set aside by an interrupted swap) is put back
  if OUT is missing, else removed.
* **Refuse.** A non-empty OUT is refused in one line unless the command was given `--replace`.
* **Write.** The command writes into `OUT.partial-XXXXXXXX` (same parent, so same filesystem).
* **Publish.** Every file is fsynced; then the old output (if any) is renamed to
  `OUT.replaced-XXXXXXXX`, the new one renamed to OUT, and the old one removed. A failed
  command removes its partial output; OUT is as it was.

A kill at any moment therefore leaves either the old complete output or the new complete one
at OUT (or, during the instant between the two renames, nothing at OUT, with the old output
intact as OUT.replaced-XXXXXXXX), plus clearly named leftovers that the next run writing OUT
removes or puts back. The commit point of a set of outputs (OUT.pt + OUT.yml) is the moment
all of them are in place; recovery before it restores every old one.

`--replace` of a checkpoint.dir (`reshard`) also takes the checkpoint.dir's own lock
(`OUT/LOCK`): a training run using it refuses the replacement.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

from launch.checkpoint.io import CheckpointError
from launch.checkpoint.lock import DirLock

REPLACE_OPTION = "--replace"
PARTIAL, REPLACED, LOCK_SUFFIX = "partial", "replaced", ".LOCK"
_TOKEN = re.compile(r"^[0-9a-f]{8}$")


def add_replace_option(parser, what: str = "OUT_DIR") -> None:
    """The one flag every publishing command takes."""
    parser.add_argument(REPLACE_OPTION, action="store_true",
                        help=f"allow replacing an existing, non-empty {what} (refused without it): the new output "
                        "is written beside it and swapped in whole once complete")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + LOCK_SUFFIX)


def partial_path(target: Path, token: str) -> Path:
    return target.with_name(f"{target.name}.{PARTIAL}-{token}")


def replaced_path(target: Path, token: str) -> Path:
    return target.with_name(f"{target.name}.{REPLACED}-{token}")


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def is_empty(path: Path) -> bool:
    """Nothing there, or an empty directory."""
    if not _present(path):
        return True
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def remove(path: Path) -> None:
    """A file, a symlink (not what it points to) or a directory tree; nothing if absent."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _rename(src: Path, dst: Path) -> None:
    """One step of a swap (os.rename: atomic within a filesystem)."""
    os.rename(src, dst)


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a tree and the tree's directories, to the disk (so a
    power loss after the rename cannot leave renamed-but-empty files)."""
    if path.is_symlink():
        return
    paths = [path]
    if path.is_dir():
        paths = [Path(root) / n for root, dirs, files in os.walk(path) for n in files] + \
                [Path(root) for root, _, _ in os.walk(path)]
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _leftover_tokens(target: Path) -> set[str]:
    tokens = set()
    if not target.parent.is_dir():
        return tokens
    for kind in (PARTIAL, REPLACED):
        prefix = f"{target.name}.{kind}-"
        for p in target.parent.glob(glob.escape(prefix) + "*"):
            token = p.name[len(prefix):]
            if _TOKEN.match(token):
                tokens.add(token)
    return tokens


def recover(targets: list[Path], carry: tuple[str, ...] = (), log=note) -> list[str]:
    """Clear what an interrupted run writing `targets` (one output set) left; under the lock.
    Returns what was done, one phrase each (also said through `log`).

    The set's new outputs were committed when every target exists: then the set-aside old
    outputs are removed (first moving `carry` entries a new directory lacks from the old one
    into it) and unfinished partial ones too. Otherwise every old output is put back, a target
    that was renamed in without an old one to replace is removed, and the partial outputs go."""
    targets = [_absolute(t) for t in targets]
    done: list[str] = []
    for token in sorted(set().union(*(_leftover_tokens(t) for t in targets))):
        committed = all(_present(t) for t in targets)
        for t in targets:
            aside, part = replaced_path(t, token), partial_path(t, token)
            if committed:
                if _present(aside):
                    if t.is_dir() and aside.is_dir():
                        for name in carry:
                            if _present(aside / name) and not _present(t / name):
                                _rename(aside / name, t / name)
                                done.append(f"moved {name} from {aside.name} into {t}")
                    remove(aside)
                    done.append(f"removed {aside.name} (the output {t.name} replaced)")
            elif _present(aside):
                if _present(t):  # the new output was renamed in already
                    remove(t)
                _rename(aside, t)
                done.append(f"put {t} back from {aside.name} (a replacement was interrupted)")
            elif _present(t) and not _present(part) and any(_present(replaced_path(u, token)) or
                                                            _present(partial_path(u, token)) for u in targets):
                remove(t)  # renamed in from the partial output, with no old output to restore
                done.append(f"removed {t} (written by an interrupted replacement)")
            if _present(part):
                remove(part)
                done.append(f"removed {part.name} (an unfinished output)")
    if done and log is not None:
        log(f"{targets[0].parent}: cleared what an interrupted run left: {'; '.join(done)}")
    return done


class Publication:
    """Write `targets` (directories, or files with `is_dir=False`) as one output set:

        with Publication([out], command="convert", replace=args.replace) as (tmp,):
            ...write into tmp...
        # complete: swapped into place; an exception: tmp removed, `out` as it was

    Steps can also be taken one at a time (`finetune` holds the lock for its whole run and
    publishes at the end): acquire() (lock + recover), check() (refuse a non-empty target
    without `replace`), start() (the partial outputs), commit(), close()."""

    def __init__(self, targets: list[str | Path], *, command: str, replace: bool = False, is_dir: bool = True,
                 carry: tuple[str, ...] = (), checkpoint_dir: bool = False, log=note):
        self.shown = [Path(t) for t in targets]
        self.targets = [_absolute(t) for t in targets]
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{command}: the outputs {', '.join(map(str, self.shown))} name the same file twice")
        self.command, self.replace, self.is_dir, self.carry = command, replace, is_dir, carry
        self.checkpoint_dir, self.log = checkpoint_dir, log
        self.token = uuid.uuid4().hex[:8]
        self.partials = [partial_path(t, self.token) for t in self.targets]
        self.locks: list[DirLock] = []
        self.started = self.committed = False

    # ------------------------------------------------------------ steps
    def acquire(self) -> Publication:
        what = "output directory" if self.is_dir else "output file"
        try:
            for t in sorted(self.targets):
                t.parent.mkdir(parents=True, exist_ok=True)
                self.locks.append(DirLock(t, lock_path(t), what=what).acquire(self.log))
            recover(self.targets, self.carry, self.log)
        except BaseException:
            self.close()
            raise
        return self

    def check(self) -> None:
        """Refuse a target that holds something, unless `replace`."""
        for t, shown in zip(self.targets, self.shown):
            if not is_empty(t):
                if not self.replace:
                    raise CheckpointError(f"{self.command}: {shown} already exists and is not empty; give "
                                          f"{REPLACE_OPTION} to replace it (swapped in whole once the new output is "
                                          "complete), or write elsewhere")
                if self.checkpoint_dir and t.is_dir() and not t.is_symlink():  # not while a run uses it
                    self.locks.append(DirLock(t).acquire(self.log))

    def start(self) -> list[Path]:
        """The partial outputs to write into (directories are created)."""
        if self.is_dir:
            for p in self.partials:
                p.mkdir()
        self.started = True
        return self.partials

    def commit(self) -> list[Path]:
        """Swap the finished partial outputs into place (see the module docstring)."""
        for p in self.partials:
            if not _present(p):
                raise CheckpointError(f"{self.command}: {p} was not written")
            _fsync(p)
        try:
            for t in self.targets:
                if _present(t):
                    _rename(t, replaced_path(t, self.token))
            for t, p in zip(self.targets, self.partials):
                _rename(p, t)
        except BaseException:
            recover(self.targets, self.carry, log=None)  # put every old output back
            raise
        self.committed = True
        for parent in {t.parent for t in self.targets}:
            _fsync(parent)
        try:
            recover(self.targets, self.carry, log=None)  # carry, then remove the old outputs
        except OSError as e:  # published all the same: the next run writing it clears what is left
            self.log(f"{self.command}: published {', '.join(map(str, self.shown))}, but could not remove what it "
                     f"replaced ({' '.join(str(e).split())}); the next run writing it will")
        return self.targets

    def abort(self) -> None:
        if self.started and not self.committed:
            for p in self.partials:
                with contextlib.suppress(OSError):
                    remove(p)

    def close(self) -> None:
        """Release every lock taken (idempotent)."""
        for lock in reversed(self.locks):
            with contextlib.suppress(OSError):
                lock.release()
        self.locks = []

    # ------------------------------------------------------------ as a context
    def __enter__(self) -> list[Path]:
        self.acquire()
        try:
            self.check()
            return self.start()
        except BaseException:
            self.abort()
            self.close()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        except OSError as e:
            self.abort()
            raise self.failed(e) from None
        finally:
            self.abort()
            self.close()
        if isinstance(exc, OSError) and self.wrote(exc):
            raise self.failed(exc) from None

    def wrote(self, e: OSError) -> bool:
        """Whether `e` is about a file of this output (a write into a partial output)."""
        names = [str(x) for x in (e.filename, e.filename2) if x is not None]
        return any(n == str(p) or n.startswith(str(p) + os.sep) for n in names for p in self.partials)

    def failed(self, e: OSError) -> CheckpointError:
        """A failed write in one line: the file being written, the cause, and that nothing changed."""
        import errno

        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else None
        why = f"{e.strerror} ({code})" if e.strerror and code else " ".join(str(e).split())
        where = f"{e.filename}: " if e.filename else ""
        out = ", ".join(map(str, self.shown))
        return CheckpointError(f"writing {out} failed: {where}{why}; nothing was published and {out} is as it was "
                               "(the unfinished output was removed)")
