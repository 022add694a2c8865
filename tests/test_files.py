"""Output files: whole or untouched, temporary names no other process shares, a disk's refusal in one line."""
import errno
import os

import pytest

from fastmnist import files
from fastmnist.files import OutputError, write_atomic


def test_temporary_names_are_unique_to_the_process_and_the_write(tmp_path, monkeypatch):
    used, replace = [], os.replace

    def recording_replace(src, dst):
        used.append(os.path.basename(src))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", recording_replace)
    write_atomic(tmp_path / "metrics.json", b"one")
    write_atomic(tmp_path / "metrics.json", b"two")
    assert len(set(used)) == 2 and all(f".metrics.json.{os.getpid()}." in name for name in used), used
    assert (tmp_path / "metrics.json").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_output_takes_the_umasks_mode(tmp_path):
    """mkstemp's 0600 made a run's files unreadable to the user's group, unlike everything else they write."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "model.pt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644


def test_a_figure_ignores_whatever_holds_the_old_fixed_temporary_name(tmp_path):
    """Two runs in one folder both wrote curves.tmp.png; one died renaming the other's away."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from fastmnist.plots import plot_curves

    (tmp_path / "curves.tmp.png").mkdir()  # another writer's, or a stale one: not ours to touch
    history = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.4, "train_acc": 0.98, "test_acc": 0.985}]
    assert plot_curves(history, tmp_path / "curves.png", log=lambda *a: None) is True
    with Image.open(tmp_path / "curves.png") as image:
        image.verify()


def test_a_disk_error_says_what_where_how_much_room_and_what_was_kept(tmp_path):
    error = OutputError(str(tmp_path / "run" / "model.pt"), OSError(errno.ENOSPC, "No space left on device"),
                        tmp_path / "run" / "model.pt")  # run/ does not exist: the free space of tmp_path
    error.kept = "the last checkpoint is intact"
    text = str(error)
    assert text.startswith(f"cannot write {tmp_path / 'run' / 'model.pt'}: No space left on device (")
    assert " free there); the last checkpoint is intact" in text and "\n" not in text
    other = OutputError("to --out x", OSError(errno.ENOTDIR, "Not a directory"), tmp_path)
    assert str(other) == "cannot write to --out x: Not a directory"  # no free space where it is not the point
