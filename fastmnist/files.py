"""Writing the files fastmnist leaves behind: atomically, and with a disk's refusal as one line.

Every file is first written in full under a temporary name unique to this
process (its pid and a random part) in its own folder, then renamed over the old one:
a crash, a kill or a full disk mid-write never leaves a broken file, and two
processes never write to the same temporary name. The bytes are made in
memory first (torch.save, savefig), so a full disk is always an OSError whose
errno says so (torch's zip writer would turn it into "unexpected pos").
"""
import errno
import io
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

# The disk's refusals a user can act on (free space, raise a quota, remount, fix permissions):
# these messages add how much room the file system has left.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


class OutputError(Exception):
    """A file or folder could not be written; the message says which, why, the free space, and what was kept."""

    def __init__(self, what: str, exc: OSError, path):
        super().__init__(what)
        self.what, self.reason = what, exc.strerror or str(exc)
        self.free = free_space(path) if exc.errno in DISK_ERRORS else None
        self.kept = None  # set by the code that knows what survived (fastmnist.runs)

    def __str__(self):
        free = "" if self.free is None else f" ({self.free} free there)"
        return f"cannot write {self.what}: {self.reason}{free}" + (f"; {self.kept}" if self.kept else "")


def free_space(path) -> str:
    """The free space on the file system holding path (or its nearest existing parent), for a message."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


@contextmanager
def writing(path, what=None):
    """Turn an OSError while writing path (disk full, read-only, no permission...) into one OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(what or str(path), exc, path) from None


def write_atomic(path, data: bytes) -> None:
    """path holds data, whole, or is as it was: written to a temporary name, synced, renamed into place."""
    path = Path(path)
    # Named by pid and a random part, created exclusively (never another's file), with the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with writing(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk gets its space back
            raise


def torch_save_atomic(obj, path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def write_json_atomic(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2).encode())


def check_writable_folder(folder, what: str) -> Path:
    """Create folder (and its parents) and check it takes a file, before any work is done for it.

    what names it in the error, e.g. "to --out runs/a": "cannot write to --out runs/a: Permission denied".
    """
    folder = Path(folder)
    with writing(folder, what):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    return folder
