import copy
import importlib
import json
import signal
import sys

import pytest
import torch

from fastmnist import runs, training_state
from fastmnist.checkpoint import CheckpointError, load_model
from fastmnist.data import load_mnist, to_float_images
from fastmnist.files import torch_save_atomic
from fastmnist.plots import plot_curves
from fastmnist.runs import run_folder
from fastmnist.train import NonFiniteLoss, TrainConfig, TrainingStopped, model_kwargs, train

train_module = importlib.import_module("fastmnist.train")  # the module, whatever the package binds to the name


def tiny(mnist_dir, out, **kw):
    base = dict(epochs=2, limit_train=1024, limit_test=500, batch_size=128, data_dir=mnist_dir, out=str(out),
                progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def quiet(*_):
    pass


def comparable(metrics):
    """The figures that must repeat exactly (times never do)."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in metrics["epochs"]]


@pytest.mark.slow
def test_short_run_clearly_beats_chance(mnist_dir, tmp_path):
    metrics = train(tiny(mnist_dir, tmp_path / "run", epochs=2, limit_train=4096, lr=0.1), log=quiet)
    assert metrics["final_test_acc"] > 0.6  # chance is 0.1
    assert metrics["parameters"] == 18410 and len(metrics["epochs"]) == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final_test_acc"] == metrics["final_test_acc"]
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(ckpt) >= {"state_dict", "model_kwargs"}


@pytest.mark.slow
def test_same_seed_same_metrics(mnist_dir, tmp_path):
    a = train(tiny(mnist_dir, tmp_path / "a", epochs=1), log=quiet)
    b = train(tiny(mnist_dir, tmp_path / "b", epochs=1), log=quiet)
    assert comparable(a) == comparable(b)


def interrupt_at_step(monkeypatch, step):
    """Deliver a real SIGINT to this process when the trainer augments batch number `step`."""
    calls = {"n": 0}
    original = train_module.random_affine

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "random_affine", wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("bn_recompute_batches", [0, 3])  # with it, the statistics the first epoch recomputed
def test_interrupt_then_resume_equals_uninterrupted_run(mnist_dir, tmp_path, monkeypatch, bn_recompute_batches):
    whole = train(tiny(mnist_dir, tmp_path / "whole", bn_recompute_batches=bn_recompute_batches), log=quiet)
    interrupt_at_step(monkeypatch, 11)  # inside the second epoch
    with pytest.raises(TrainingStopped, match=r"fastmnist train --resume .*cut"):
        train(tiny(mnist_dir, tmp_path / "cut", bn_recompute_batches=bn_recompute_batches), log=quiet)
    state = training_state.load(tmp_path / "cut")
    assert (state["epoch"], state["step"], state["kind"]) == (1, 3, "interrupted")
    monkeypatch.undo()
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), progress=False), resume=True, log=quiet)
    assert comparable(resumed) == comparable(whole)
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # model.pt is the weight average, which the checkpoint carried across the interruption.
    whole_state, cut_state = (training_state.load(tmp_path / run) for run in ("whole", "cut"))
    assert whole_state["ema"]["updates"] == cut_state["ema"]["updates"] == 2 * 8  # 1024 images, 128 a step
    for key, value in whole_state["ema"]["module"].items():
        assert torch.equal(value, cut_state["ema"]["module"][key]), key
    assert not torch.equal(b["1.conv.weight"], cut_state["model"]["1.conv.weight"])


@pytest.mark.slow
def test_without_the_average_model_pt_holds_the_trained_weights(mnist_dir, tmp_path):
    train(tiny(mnist_dir, tmp_path / "run", epochs=1, ema_decay=0.0), log=quiet)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    state = training_state.load(tmp_path / "run")
    assert state["ema"] is None
    for key, value in state["model"].items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch):
    original = train_module.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] == 8 + 5:  # epoch 2, step 5
                return original(logits, target, *args, **kwargs) * float("nan")
        return original(logits, target, *args, **kwargs)

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLoss, match="epoch 2, step 5"):
        train(tiny(mnist_dir, tmp_path / "run"), log=quiet)
    state = training_state.load(tmp_path / "run")
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_existing_run_is_not_replaced(mnist_dir, tmp_path):
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    with pytest.raises(runs.RunExistsError, match="--resume .* --overwrite"):
        train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), overwrite=True, log=quiet)


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_layout_says_what_to_do(mnist_dir, tmp_path):
    """A checkpoint whose keys are another version's (v1 had separate Dropout2d layers) is refused in one line."""
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    state = training_state.load(tmp_path / "run")
    state["model"] = {f"9{k}": v for k, v in state["model"].items()}
    training_state.save(tmp_path / "run", state)
    with pytest.raises(CheckpointError, match="another fastmnist version.*--overwrite"):
        train(tiny(mnist_dir, tmp_path / "run", epochs=2), resume=True, log=quiet)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    torch_save_atomic({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        torch_save_atomic({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


# Damaged runs and data: one CheckpointError or MNISTDataError with the remedy; nothing of the old run lost.

def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path):
    """--overwrite used to delete the old run before the new one had even loaded its data."""
    from fastmnist.data import FILES, MNISTDataError

    out, bad_data = tmp_path / "run", tmp_path / "data"
    out.mkdir()
    bad_data.mkdir()
    for name in runs.REPLACED_FILES:
        (out / name).write_bytes(f"old {name}".encode())
    for name in FILES:
        (bad_data / name).write_bytes(b"not MNIST")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(MNISTDataError, match="md5"):
        train(tiny(str(bad_data), out), overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory):
    """A two-step run (one epoch of 256 images), to be damaged copy by copy."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    train(tiny(mnist_dir, out, epochs=1, limit_train=256, limit_test=100), log=quiet)
    return out


def damaged_copy(finished_run, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    state = training_state.load(out)
    damage(state)
    training_state.save(out, state)
    return out


def set_in(key, value, inner=None):
    def damage(state):
        if inner is None:
            state[key] = value
        else:
            state[key][inner] = value
    return damage


@pytest.mark.slow  # finished_run trains a model
@pytest.mark.parametrize("damage, words", [
    (set_in("config", 1, "bogus_setting"), r"unknown settings \['bogus_setting'\]"),
    (set_in("config", "many", "epochs"), r"wrong type or out of range for \['epochs'\]"),
    (set_in("config", 0, "batch_size"), r"wrong type or out of range for \['batch_size'\]"),
    (set_in("config", "all", "limit_train"), r"wrong type or out of range for \['limit_train'\]"),
    (set_in("optimizer", {"state": 5, "param_groups": "x"}), "its optimiser state cannot be restored"),
    (set_in("scheduler", 3), "its scheduler state cannot be restored"),
    (set_in("rng", {"torch": "x"}), "random number generator states cannot be restored"),
    (set_in("sums", [1, 2]), "its position cannot be restored"),
    (set_in("epoch", 5), "an impossible position"),
    (set_in("history", []), "an impossible position"),
    (set_in("step", -1), "an impossible position"),
], ids=["config_key", "config_type", "config_range", "config_limit", "optimizer", "scheduler", "rng", "sums", "epoch", "history", "step"])
def test_a_damaged_checkpoint_is_refused_in_one_error(finished_run, mnist_dir, tmp_path, damage, words):
    out = damaged_copy(finished_run, tmp_path, damage)
    with pytest.raises(CheckpointError, match=rf"checkpoint.pt: .*{words}.*--overwrite"):
        train(TrainConfig(out=str(out), data_dir=mnist_dir, progress=False), resume=True, log=quiet)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_in_the_cli(finished_run, mnist_dir, tmp_path):
    from conftest import run_cli

    out = damaged_copy(finished_run, tmp_path, set_in("config", 1, "bogus_setting"))
    result = run_cli("train", "--resume", str(out), "--data-dir", mnist_dir, "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error:") and "bogus_setting" in lines[0]


def test_a_run_killed_in_its_first_epoch_is_explained(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # what prepare_out_dir left before SIGKILL came, in the first epoch
    with pytest.raises(CheckpointError, match=r"killed during its first epoch .*--overwrite"):
        train(TrainConfig(out=str(out), progress=False), resume=True, log=quiet)


@pytest.mark.slow
def test_a_second_ctrl_c_is_one_line_not_a_traceback(mnist_dir, tmp_path, monkeypatch, capsys):
    from fastmnist.cli import main

    calls = {"n": 0}
    original = train_module.random_affine

    def twice(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # stop at the next step...
            signal.raise_signal(signal.SIGINT)  # ...no, now
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "random_affine", twice)
    try:
        code = main(["train", "--epochs", "1", "--limit-train", "512", "--limit-test", "100", "--no-progress",
                     "--data-dir", mnist_dir, "--out", str(tmp_path / "run")])
    except KeyboardInterrupt:  # caught here, or pytest would take it for the user's and stop the session
        pytest.fail("the second Ctrl-C escaped main() as a KeyboardInterrupt (a 50-line traceback for the user)")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error: SIGINT again: stopped at once"), err


# One place for each decision: the fused path, the run folder; and the optional plot.

def test_impl_fused_where_the_build_cannot_run_it_is_a_value_error(monkeypatch):
    """ops.require_fused's RuntimeError becomes an argument error, which the CLI shows as one line."""
    from fastmnist import ops

    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda device_type=None: "no kernels here; use --impl stock")
    with pytest.raises(ValueError, match="^--impl fused: no kernels here; use --impl stock$"):
        model_kwargs(TrainConfig(impl="fused"), torch.device("cpu"))
    assert model_kwargs(TrainConfig(impl="auto"), torch.device("cpu"))["impl"] == "stock"  # auto falls back


def test_the_run_folder_is_out_or_a_new_one_named_by_seed(tmp_path):
    assert run_folder(TrainConfig(out=str(tmp_path / "run"))) == tmp_path / "run"
    default = run_folder(TrainConfig(seed=7))
    assert default.parent.name == "runs" and default.name.endswith("-seed7")


def test_curves_are_skipped_in_one_line_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    lines = []
    history = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.4, "train_acc": 0.9, "test_acc": 0.95}]
    assert plot_curves(history, tmp_path / "curves.png", log=lines.append) is False
    assert lines == ["fastmnist: curves.png skipped: pip install matplotlib (the `plot` extra)"]
    assert not (tmp_path / "curves.png").exists()


def bn_statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def bn_errors_against_a_recomputation(mnist_dir, model_pt):
    """Relative error of each BN buffer of model_pt against update_bn on the 1,024 training images of tiny()."""
    saved, _ = load_model(model_pt)
    images = load_mnist(mnist_dir).train_images[:1024]
    fresh = copy.deepcopy(saved)
    torch.optim.swa_utils.update_bn([to_float_images(images[i : i + 128]) for i in range(0, 1024, 128)], fresh)
    old = bn_statistics(saved)
    return [float((old[k] - v).norm() / v.norm()) for k, v in bn_statistics(fresh).items()]


@pytest.mark.slow
def test_the_saved_bn_statistics_are_those_of_the_saved_weights(mnist_dir, tmp_path):
    """With bn_recompute_batches, model.pt's BN statistics are its own weights' on the training images (the
    weight average's averaged statistics belong to earlier weights: stale, they made seed 0's 97.91% dip),
    and training itself is untouched."""
    runs = {n: train(tiny(mnist_dir, tmp_path / str(n), lr=0.4, ema_decay=0.99, bn_recompute_batches=n), log=quiet)
            for n in (8, 0)}
    assert max(bn_errors_against_a_recomputation(mnist_dir, tmp_path / "8" / "model.pt")) < 0.01
    # The check tells stale statistics apart: the averaged ones are far off.
    assert max(bn_errors_against_a_recomputation(mnist_dir, tmp_path / "0" / "model.pt")) > 0.1
    assert [r["train_loss"] for r in runs[8]["epochs"]] == [r["train_loss"] for r in runs[0]["epochs"]]
    assert runs[8]["epochs"][-1]["bn_recompute_seconds"] > 0 == runs[0]["epochs"][-1]["bn_recompute_seconds"]
