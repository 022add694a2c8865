"""Checkpoints a user may hand us broken: each fails in one line with the remedy; --overwrite loses nothing."""
import pytest
import torch

from conftest import one_line_error, run_cli
from fastmnist import checkpoint
from fastmnist.checkpoint import PREVIOUS_RUN, CheckpointError, RunExistsError, load_model


def test_an_empty_model_file_is_one_line(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_model(path)
    assert "empty file" in one_line_error(run_cli("eval", "--checkpoint", str(path)))


def test_an_empty_training_checkpoint_is_one_line(tmp_path):
    (tmp_path / checkpoint.STATE_FILE).write_bytes(b"")
    assert "empty file" in one_line_error(run_cli("train", "--resume", str(tmp_path)))


@pytest.mark.parametrize("kwargs", [7, "default", ["name", "default"], {1: "default"}])
def test_model_kwargs_that_are_not_a_dict_are_refused(untrained_model, tmp_path, kwargs):
    ckpt = torch.load(untrained_model, weights_only=True)
    ckpt["model_kwargs"] = kwargs
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="model_kwargs is a .*, not a dict"):
        load_model(path)


def test_model_kwargs_not_a_dict_is_one_line_in_the_cli(untrained_model, tmp_path):
    ckpt = torch.load(untrained_model, weights_only=True)
    ckpt["model_kwargs"] = 7
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    assert "model_kwargs is a int" in one_line_error(run_cli("eval", "--checkpoint", str(path)))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_is_refused(untrained_model, tmp_path, value):
    ckpt = torch.load(untrained_model, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("running_var"))
    ckpt["state_dict"][key][1] = value
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"the model is broken: {key} hold NaN or infinite values.*retrain"):
        load_model(path)


def fake_run(folder, tag):
    folder.mkdir(parents=True, exist_ok=True)
    for name in checkpoint.REPLACED_FILES:
        (folder / name).write_bytes(f"{tag} {name}".encode())


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_overwrite_moves_the_old_run_aside_until_the_new_one_has_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    checkpoint.prepare_out_dir(out, overwrite=True)
    assert not any((out / name).exists() for name in checkpoint.REPLACED_FILES)
    assert contents(out / PREVIOUS_RUN) == old  # nothing deleted yet
    checkpoint.save_training_state(out, {"epoch": 1})
    assert not (out / PREVIOUS_RUN).exists()  # the new run has a checkpoint: the old one goes


def test_a_replacing_run_that_fails_first_gives_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    checkpoint.prepare_out_dir(out, overwrite=True)
    checkpoint.restore_previous_run(out)
    assert contents(out) == old and not (out / PREVIOUS_RUN).exists()


def test_a_replacing_run_killed_before_its_first_checkpoint_loses_nothing(tmp_path):
    """SIGKILL leaves the old run aside; the next start puts it back first, so it is refused again."""
    out = tmp_path / "run"
    fake_run(out, "old")
    old = contents(out)
    checkpoint.prepare_out_dir(out, overwrite=True)  # ...and then the process was killed
    with pytest.raises(RunExistsError, match="--overwrite"):
        checkpoint.prepare_out_dir(out, overwrite=False)
    assert contents(out) == old


def test_resume_after_a_killed_overwrite_continues_the_old_run(tmp_path):
    """The old run's checkpoint.pt waits aside; --resume puts it back before reading it."""
    from fastmnist.train import TrainConfig, train

    out = tmp_path / "run"
    fake_run(out, "old")
    checkpoint.prepare_out_dir(out, overwrite=True)  # ...and then the process was killed
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):  # the fake one, found
        train(TrainConfig(out=str(out), progress=False), resume=True, log=lambda *a: None)
    assert (out / checkpoint.STATE_FILE).read_bytes() == b"old checkpoint.pt"


def test_a_loaded_model_runs_the_path_resolve_impl_picks_for_its_device(untrained_model):
    """The saved impl (stock here) does not decide: layers.resolve_impl does, for the device it is loaded on."""
    from fastmnist.layers import ConvReLUBN, resolve_impl

    model, kwargs = load_model(untrained_model, device="cpu")
    assert kwargs["impl"] == "stock"  # as saved
    impls = {m.impl for m in model.modules() if isinstance(m, ConvReLUBN)}
    assert impls == {resolve_impl("auto", "cpu")}
