"""Checkpoints a user may hand us broken: each fails in one line with the remedy."""
import pytest
import torch

from conftest import one_line_error, run_cli
from fastmnist import training_state
from fastmnist.checkpoint import CheckpointError, load_model


def test_an_empty_model_file_is_one_line(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_model(path)
    assert "empty file" in one_line_error(run_cli("eval", "--checkpoint", str(path)))


def test_an_empty_training_checkpoint_is_one_line(tmp_path):
    (tmp_path / training_state.STATE_FILE).write_bytes(b"")
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


def test_a_loaded_model_runs_the_path_resolve_impl_picks_for_its_device(untrained_model):
    """The saved impl (stock here) does not decide: layers.resolve_impl does, for the device it is loaded on."""
    from fastmnist.layers import ConvReLUBN, resolve_impl

    model, kwargs = load_model(untrained_model, device="cpu")
    assert kwargs["impl"] == "stock"  # as saved
    impls = {m.impl for m in model.modules() if isinstance(m, ConvReLUBN)}
    assert impls == {resolve_impl("auto", "cpu")}
