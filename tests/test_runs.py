"""A run's folder: one process at a time, --overwrite that loses nothing, a full disk and signals as one line."""
import fcntl
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

from fastmnist import runs, training_state
from fastmnist.checkpoint import CheckpointError
from fastmnist.runs import PREVIOUS_RUN, RunExistsError
from fastmnist.train import TrainConfig, TrainingStopped, train

train_module = importlib.import_module("fastmnist.train")  # the module, whatever the package binds to the name
TINY = ["--model", "tiny", "--epochs", "2", "--limit-train", "256", "--limit-test", "100", "--no-progress"]


def quiet(*_):
    pass


def fake_run(folder, tag):
    folder.mkdir(parents=True, exist_ok=True)
    for name in runs.REPLACED_FILES:
        (folder / name).write_bytes(f"{tag} {name}".encode())


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --overwrite: the old run is set aside, and dropped only once the new run has an epoch of its own.

def test_overwrite_moves_the_old_run_aside_until_the_new_one_has_an_epoch(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    runs.set_aside_old_run(out, overwrite=True)
    assert not any((out / name).exists() for name in runs.REPLACED_FILES)
    assert contents(out / PREVIOUS_RUN) == old  # nothing deleted yet
    assert runs.replacing(out)
    (out / training_state.STATE_FILE).write_bytes(b"the new run's first epoch")  # ...then killed before the drop
    assert runs.settle_previous_run(out) is False
    assert contents(out) == {training_state.STATE_FILE: b"the new run's first epoch"}


def test_a_replacing_run_that_fails_first_gives_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    runs.set_aside_old_run(out, overwrite=True)
    assert runs.settle_previous_run(out) is True
    assert contents(out) == old and not (out / PREVIOUS_RUN).exists()


def test_a_replacing_run_killed_before_its_first_checkpoint_loses_nothing(tmp_path):
    """SIGKILL leaves the old run aside; the next start puts it back first, so it is refused again."""
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    runs.set_aside_old_run(out, overwrite=True)  # ...and then the process was killed
    with pytest.raises(RunExistsError, match="--overwrite"):
        with runs.claim(out, resume=False, overwrite=False):
            pass
    assert contents(out) == old


def test_resume_after_a_killed_overwrite_continues_the_old_run(tmp_path):
    """The old run's checkpoint.pt waits aside; --resume puts it back before reading it."""
    out = tmp_path / "run"
    fake_run(out, "old")
    runs.set_aside_old_run(out, overwrite=True)  # ...and then the process was killed
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):  # the fake one, found
        train(TrainConfig(out=str(out), progress=False), resume=True, log=quiet)
    assert (out / training_state.STATE_FILE).read_bytes() == b"old checkpoint.pt"


# One process per folder (issue 19, defect 1).

def hold_lock(folder):
    """Lock folder as a running fastmnist would, from this process (flock conflicts between open files)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / runs.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@pytest.mark.parametrize("mode", ["new", "resume", "overwrite"])
def test_a_folder_in_use_is_refused_naming_the_holder(tmp_path, mnist_dir, mode, capsys):
    from fastmnist.cli import main

    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    fd = hold_lock(out)
    try:
        args = {"new": [*TINY, "--out", str(out)], "resume": ["--resume", str(out)],
                "overwrite": [*TINY, "--out", str(out), "--overwrite"]}[mode]
        assert main(["train", *args, "--data-dir", mnist_dir]) == 2
    finally:
        os.close(fd)
    assert f"{out} is in use by another fastmnist process (pid {os.getpid()})" in error_line(capsys)
    assert {k: v for k, v in contents(out).items() if k != runs.LOCK_FILE} == old


def test_the_lock_is_released_and_taken_again(tmp_path):
    out = tmp_path / "run"
    with runs.claim(out, resume=False, overwrite=False):
        assert (out / runs.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(runs.RunInUseError, match=f"pid {os.getpid()}"):
            runs.lock_folder(out, create=True)
    assert not (out / runs.LOCK_FILE).exists()
    with runs.claim(out, resume=False, overwrite=False):  # free again
        pass


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    """The kernel drops an flock with its process, SIGKILL included: a stale .lock never blocks a folder."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / runs.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(runs.RunInUseError, match=f"pid {holder.pid}\\)"):
            runs.lock_folder(out, create=True)
    finally:
        holder.kill()
        holder.wait()
    with runs.claim(out, resume=False, overwrite=False):
        assert (out / runs.LOCK_FILE).read_text() == f"{os.getpid()}\n"


# Signals (issue 19, defect 7): a stop before the new run's first epoch ends gives the old run back.

def test_a_stop_in_a_replacing_runs_first_epoch_puts_the_old_run_back(mnist_dir, tmp_path, monkeypatch):
    """SIGTERM a fraction of a second into training used to save a step-1 checkpoint and delete the old model."""
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    original, calls = train_module.random_affine, {"n": 0}

    def stop_at_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "random_affine", stop_at_step_2)
    cfg = TrainConfig(model="tiny", epochs=1, limit_train=1024, limit_test=100, batch_size=128, data_dir=mnist_dir,
                      out=str(out), progress=False)
    with pytest.raises(TrainingStopped, match=r"SIGTERM: .*nothing of it was saved.*back in .*unchanged"):
        train(cfg, overwrite=True, log=quiet)
    assert contents(out) == old and not (out / PREVIOUS_RUN).exists()


def test_sigterm_while_a_replacing_run_starts_puts_the_old_run_back(mnist_dir, tmp_path):
    """SIGTERM after the old run was set aside, before training began, used to kill at once, leaving it aside."""
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastmnist.cli", "train", "--model", "tiny", "--no-progress",
                             "--data-dir", mnist_dir, "--out", str(out), "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out / PREVIOUS_RUN).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGTERM" in err and "back in" in err and "Traceback" not in err
    assert contents(out) == old and not (out / PREVIOUS_RUN).exists()


# A full or read-only disk (issue 19, defect 2): one line, exit 2, the last checkpoint intact and resumable.

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test: root only. CI runs as root, so there it must never skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"the disk-full tests must run in CI: {reason}")
        pytest.skip(reason)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_the_disk_full_tests_run_in_ci():
    """They may skip on a developer's machine without root, never in CI (where they run as root)."""
    if os.environ.get("CI"):
        assert os.geteuid() == 0, "CI must run the tests as root so that small_disk can mount a tmpfs"


def fill(disk):
    """Take every free byte of disk."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 10, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError:
                    break
    finally:
        os.close(fd)


def fill_after_first_save(monkeypatch, disk):
    original = training_state.save

    def save_then_fill(out, state):
        original(out, state)
        if not (disk / "filler").exists():
            fill(disk)

    monkeypatch.setattr(training_state, "save", save_then_fill)


def error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error: "), lines
    return lines[0]


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(small_disk, mnist_dir, monkeypatch, capsys):
    from fastmnist.cli import main

    out = small_disk / "run"
    fill_after_first_save(monkeypatch, small_disk)  # room for epoch 1's checkpoint, none for epoch 2's
    assert main(["train", *TINY, "--data-dir", mnist_dir, "--out", str(out)]) == 2
    line = error_line(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device (0 bytes free there)" in line
    assert f"the last checkpoint, {out / 'checkpoint.pt'}, is intact" in line
    assert f"fastmnist train --resume {out}" in line
    assert training_state.load(out)["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind

    monkeypatch.undo()  # the disk is still full: --resume says the same
    assert main(["train", "--resume", str(out), "--data-dir", mnist_dir, "--no-progress"]) == 2
    assert "No space left on device" in error_line(capsys) and training_state.load(out)["epoch"] == 1

    (small_disk / "filler").unlink()
    assert main(["train", "--resume", str(out), "--data-dir", mnist_dir, "--no-progress"]) == 0
    assert training_state.load(out)["epoch"] == 2 and (out / "model.pt").exists()


def test_no_room_for_model_pt_is_one_line_not_a_torch_error(small_disk, tmp_path):
    """torch.save onto a full disk said "[enforce fail at inline_container.cc] unexpected pos"."""
    from fastmnist.checkpoint import save_model
    from fastmnist.files import OutputError
    from fastmnist.model import build_model

    fill(small_disk)
    with pytest.raises(OutputError, match=rf"cannot write {small_disk / 'model.pt'}: No space left on device"):
        save_model(small_disk / "model.pt", build_model("tiny", impl="stock"), {"name": "tiny"})
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_read_only_disk_is_one_line(small_disk, mnist_dir, capsys):
    from fastmnist.cli import main

    fake_run(small_disk / "run", "old")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["train", *TINY, "--data-dir", mnist_dir, "--out", str(small_disk / "run"), "--overwrite"]) == 2
    assert "Read-only file system" in error_line(capsys)
    assert main(["train", "--resume", str(small_disk / "run")]) == 2
    assert "Read-only file system" in error_line(capsys)
