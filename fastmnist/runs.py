"""A run's folder: its name, one process at a time, and --overwrite that loses nothing.

A run folder holds checkpoint.pt (fastmnist.training_state), rewritten after
every epoch, and at the end metrics.json, model.pt and curves.png. While a run
is in it:
- The folder is locked: an flock on RUN/.lock, held for the run's life and
  released by the kernel however the process ends. A second `train`,
  `--resume` or `--overwrite` on it refuses, naming the holder's pid.
- --overwrite moves the old run into RUN/.previous-run and deletes it only
  after the new run's first *epoch* checkpoint; whatever ends the new run
  before that (an error, a full disk, a signal, a kill) puts the old run back:
  at once, or when the folder is next used.
"""
import errno
import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from fastmnist import training_state
from fastmnist.files import OutputError, check_writable_folder, writing
from fastmnist.stopping import TrainingStopped
from fastmnist.training_state import STATE_FILE

RUN_FILES = (STATE_FILE, "metrics.json", "model.pt")
REPLACED_FILES = RUN_FILES + ("curves.png",)
PREVIOUS_RUN = ".previous-run"  # where --overwrite keeps the old run until the new one has an epoch
LOCK_FILE = ".lock"


class RunExistsError(Exception):
    """--out already holds a run and neither --resume nor --overwrite was given."""


class RunInUseError(Exception):
    """Another process is running in this folder."""


def run_folder(cfg) -> Path:
    """The run's folder: cfg.out, else a new one under runs/ named by start time and seed."""
    return Path(cfg.out or Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-seed{cfg.seed}"))


@contextmanager
def claim(out: Path, resume: bool, overwrite: bool):
    """The folder, held by this process for the block; a new run's old one set aside, back if the block fails.

    A run that --overwrite had set aside and that was killed is settled first:
    put back, or dropped if the replacing run got as far as its first epoch.
    On an OutputError (a full disk...) the error is told what was kept.
    """
    out = Path(out)
    lock = lock_folder(out, create=not resume)  # a missing folder to resume: training_state.load says so
    try:
        settle_previous_run(out)
        if not resume:
            set_aside_old_run(out, overwrite)
        try:
            yield
        except BaseException as exc:
            restored = settle_previous_run(out)
            if isinstance(exc, OutputError):
                exc.kept = what_was_kept(out, restored)
            raise
    finally:
        unlock_folder(lock, out)


def lock_folder(out: Path, create: bool):
    """An open, flock-ed RUN/.lock holding our pid (None when out does not exist and create is False)."""
    if create:
        check_writable_folder(out, f"to --out {out}")
    elif not out.is_dir():
        return None
    path = out / LOCK_FILE
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"{out} is in use by another fastmnist process (pid {holder}); wait for it to end "
                                "or stop it, or choose another --out") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder deleted it as it ended, between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same; a refused process just cannot name us
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def unlock_folder(fd, out: Path) -> None:
    """Delete, then release, the lock: a process that opened the old file finds it gone and opens anew."""
    if fd is None:
        return
    try:
        os.unlink(out / LOCK_FILE)
    except OSError:
        pass
    os.close(fd)


def set_aside_old_run(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless overwrite; with it, move the old run into PREVIOUS_RUN."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if existing:
        with writing(out / PREVIOUS_RUN, f"to --out {out}"):
            (out / PREVIOUS_RUN).mkdir(exist_ok=True)
            for name in REPLACED_FILES:
                if (out / name).exists():
                    os.replace(out / name, out / PREVIOUS_RUN / name)


def replacing(out: Path) -> bool:
    """Whether this run still has an old run set aside: it has no epoch checkpoint of its own yet."""
    return (Path(out) / PREVIOUS_RUN).is_dir()


def drop_previous_run(out: Path) -> None:
    """The new run has its first epoch checkpoint: the run it replaces goes."""
    shutil.rmtree(Path(out) / PREVIOUS_RUN, ignore_errors=True)


def settle_previous_run(out: Path) -> bool:
    """Put back the run --overwrite set aside, unless the new run has a checkpoint; True if it was put back.

    A replacing run saves nothing until its first epoch ends, and then drops
    the old run at once: a checkpoint next to PREVIOUS_RUN means a kill came
    between the two, and the new run stands.
    """
    aside = Path(out) / PREVIOUS_RUN
    if not aside.is_dir():
        return False
    if (Path(out) / STATE_FILE).exists():
        drop_previous_run(out)
        return False
    for path in aside.iterdir():
        os.replace(path, Path(out) / path.name)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def what_was_kept(out: Path, restored: bool) -> str:
    """For a failed run's message: what the folder holds now."""
    if restored:
        return f"the run that was in {out} before is back, unchanged"
    if (out / STATE_FILE).is_file():
        return (f"the last checkpoint, {out / STATE_FILE}, is intact: once there is room, continue with "
                f"`fastmnist train --resume {out}`")
    return "nothing was kept: the run had not finished an epoch"


def stop_here(run, signal_name: str) -> None:
    """A signal stopped a fastmnist.training_state.Run: save its position and raise TrainingStopped saying so.

    A replacing run stopped before its first epoch ended saves nothing: claim
    puts the old run back as the exception leaves, and the message says so.
    """
    where = f"{signal_name}: stopped at epoch {run.epoch + 1}, step {run.step}/{run.steps_per_epoch}"
    if replacing(run.out):
        raise TrainingStopped(f"{where}, before the new run's first epoch ended: nothing of it was saved, and the "
                              f"run it was replacing is back in {run.out}, unchanged")
    training_state.save(run.out, training_state.capture(run, "interrupted"))
    raise TrainingStopped(f"{where}; saved to {run.out / STATE_FILE}. Resume with: fastmnist train --resume {run.out}")
