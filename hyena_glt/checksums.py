"""Verifiable saved model directories: `checksums.json` records the size and sha256 of every
file `write_pretrained` wrote, and loading checks them.

    DIR/
      config.json          the model config
      model.safetensors    the weights
      head.json | tasks.json  (fine-tuned models) the head(s)
      checksums.json       {"format": "hyena-glt-model-checksums", "version": 1,
                            "files": {"config.json": {"size": N, "sha256": "..."}, ...}}

`verify_pretrained(DIR)` (called by `read_config(DIR, need_weights=True)`, so by every
`from_pretrained`, `load_pretrained`, `inspect_pretrained` and the commands built on them)
hashes every recorded file and raises one `ModelChecksumError` line naming the first file
that is missing, of another size or another sha256. A file that passed is not hashed again
by the same process (keyed by path, inode, size and mtime, as the pack shards of
data_tools/dataset.py). Off: `verify=False`, or HYENA_GLT_VERIFY_MODEL=0 in the environment.
A directory without checksums.json (saved before they were recorded) loads unverified, and
the process says so once per directory on stderr. A save writes checksums.json first as a
placeholder (`"incomplete": true`) and last for real, so a directory whose save did not
finish (killed, a full disk: half old files, half new) is refused, never loaded. `check_pretrained(DIR)` gives every file's
status without raising (`hyena-glt info --verify`).

Also here, shared with launch/checkpoint/: the atomic writes every saved file goes through
(`write_text_atomic`, `write_safetensors`: a temporary sibling renamed into place), with
safetensors' own I/O errors turned into an OSError that names the file being written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "hyena-glt-model-checksums"
CHECKSUMS_VERSION = 1
VERIFY_ENV = "HYENA_GLT_VERIFY_MODEL"
_HASH_CHUNK = 8 << 20
_verified: set[tuple] = set()  # (path, device, inode, size, mtime_ns, sha256) of files that matched
_said_unrecorded: set[str] = set()  # directories already reported as having no checksums.json


class ModelChecksumError(ValueError):
    """A file of a saved model directory that differs from its checksums.json. One line."""


def verify_by_default() -> bool:
    """True unless HYENA_GLT_VERIFY_MODEL is 0/false/no/off."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------- writing
def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask (0o644 under the usual
    022). safetensors writes its files 0o600 whatever the umask; every writer of a weights file
    (save_pretrained, convert, checkpoints) sets this mode, so all files of a saved model or
    checkpoint share one mode, the one its JSON files get."""
    try:  # Linux >= 4.7: read without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def file_record(path: str | Path) -> dict:
    """{"size", "sha256"} of a file (what checksums.json and a checkpoint's meta.json record)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: str | Path, text: str) -> dict:
    """A text file written through a temporary sibling renamed into place; its file_record."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text)
        record = file_record(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def safetensors_write_error(e: Exception, path: str | Path) -> Exception:
    """safetensors' SafetensorError from a write, as an OSError naming `path` when the cause is
    the system's (a full disk: 'I/O error: No space left on device (os error 28)'), so that it
    is handled as any failed write is (one line naming the file and the cause)."""
    m = _OS_ERROR.search(str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    if "I/O error" in str(e):
        return OSError(errno.EIO, " ".join(str(e).split()), str(path))
    return e


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> dict:
    """A safetensors file (contiguous CPU copies of the tensors) written through a temporary
    sibling renamed into place, with the mode of any new file (new_file_mode). Returns its
    file_record. A failed write (a full disk...) leaves nothing and raises an OSError naming
    `path`."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise safetensors_write_error(e, path) from None
        os.chmod(tmp, new_file_mode())  # as the JSON files (safetensors writes 0o600)
        record = file_record(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename == str(tmp):  # name the file the caller writes, not its temporary sibling
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def write_checksums(directory: str | Path, files: dict[str, dict] | None) -> None:
    """checksums.json: the size and sha256 of `files` (name -> file_record), written last.
    `files=None`: the placeholder a save writes first, so that a directory whose save did not
    finish (killed, a full disk) is refused rather than loaded half old, half new."""
    body = {"format": CHECKSUMS_FORMAT, "version": CHECKSUMS_VERSION}
    body.update({"incomplete": True, "files": {}} if files is None else {"files": dict(sorted(files.items()))})
    write_text_atomic(Path(directory) / CHECKSUMS_NAME, json.dumps(body, indent=2) + "\n")


# ---------------------------------------------------------------- reading
def read_checksums(directory: str | Path) -> dict[str, dict] | None:
    """The recorded files (name -> {"size", "sha256"}), None when the directory has no
    checksums.json. ModelChecksumError for one that is not ours or not readable."""
    path = Path(directory) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelChecksumError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())}): the "
                                 f"directory's checksums cannot be read (set {VERIFY_ENV}=0 to load it unverified)") from None
    files = body.get("files") if isinstance(body, dict) else None
    if isinstance(body, dict) and body.get("format") == CHECKSUMS_FORMAT and body.get("incomplete"):
        raise ModelChecksumError(f"{Path(directory)}: the save that wrote this directory did not finish ({CHECKSUMS_NAME} "
                                 "is still its placeholder): its files may be half old, half new; save it again")
    ok = (isinstance(body, dict) and body.get("format") == CHECKSUMS_FORMAT and isinstance(files, dict)
          and all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                  and isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
                  for n, r in files.items()))
    if not ok:
        raise ModelChecksumError(f"{path}: not a {CHECKSUMS_FORMAT} file (expected format, version and files with "
                                 f"each file's size and sha256; set {VERIFY_ENV}=0 to load the directory unverified)")
    return files


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # "ok", "damaged", "missing" or "not recorded"
    detail: str  # a sentence: sizes and checksums

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "not recorded")


def _sha256_of(path: Path, expected: str) -> tuple[str, tuple]:
    """(sha256, cache key) of a file, read once through one descriptor."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, expected)
        if key in _verified:
            return expected, key
        h = hashlib.sha256()
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest(), key


def _check_one(directory: Path, name: str, record: dict) -> FileCheck:
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return FileCheck(name, "missing", f"missing, but {CHECKSUMS_NAME} lists it ({record['size']:,} bytes)")
    if size != record["size"]:
        return FileCheck(name, "damaged", f"damaged: {size:,} bytes but {CHECKSUMS_NAME} expects {record['size']:,}")
    actual, key = _sha256_of(path, record["sha256"])
    if actual != record["sha256"]:
        return FileCheck(name, "damaged", f"damaged: sha256 {actual} but {CHECKSUMS_NAME} expects {record['sha256']}")
    _verified.add(key)
    return FileCheck(name, "ok", f"ok ({size:,} bytes, sha256 {actual})")


def check_pretrained(directory: str | Path) -> list[FileCheck] | None:
    """Every file's status (recorded files first, in checksums.json's order, then the files it
    does not list), or None for a directory without checksums.json. Never raises for a damaged
    file (ModelChecksumError only for an unreadable checksums.json)."""
    directory = Path(directory)
    files = read_checksums(directory)
    if files is None:
        return None
    out = [_check_one(directory, name, rec) for name, rec in files.items()]
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                    if p.name not in files and p.name != CHECKSUMS_NAME)
    return out + [FileCheck(n, "not recorded", "not recorded (not written by save_pretrained; not verified)")
                  for n in others]


def verify_pretrained(directory: str | Path, log=None) -> bool:
    """Check every file checksums.json records; ModelChecksumError naming the first that is
    missing or damaged. True when verified; False for a directory without checksums.json
    (said once per directory and process, through `log`: stderr by default)."""
    directory = Path(directory)
    files = read_checksums(directory)
    if files is None:
        key = str(directory.resolve())
        if key not in _said_unrecorded:
            _said_unrecorded.add(key)
            say = log or (lambda m: print(m, file=sys.stderr, flush=True))
            say(f"note: {directory} has no {CHECKSUMS_NAME} (saved before hyena-glt recorded checksums): its files "
                "are loaded without verification; save it again to add them")
        return False
    for name, rec in files.items():
        check = _check_one(directory, name, rec)
        if not check.ok:
            raise ModelChecksumError(f"{directory / name}: {check.detail}; restore the directory from a good copy "
                                     f"(`hyena-glt info --verify {directory}` checks every file)")
    return True
