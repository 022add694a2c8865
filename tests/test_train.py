import json
import signal

import pytest
import torch

from fastmnist import checkpoint, train as train_module
from fastmnist.train import NonFiniteLoss, TrainConfig, TrainingStopped, train


def tiny(mnist_dir, out, **kw):
    base = dict(epochs=2, limit_train=1024, limit_test=500, batch_size=128, data_dir=mnist_dir, out=str(out),
                progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def quiet(*_):
    pass


def comparable(metrics):
    """The figures that must repeat exactly (times never do)."""
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in metrics["epochs"]]


def test_short_run_clearly_beats_chance(mnist_dir, tmp_path):
    metrics = train(tiny(mnist_dir, tmp_path / "run", epochs=2, limit_train=4096, lr=0.1), log=quiet)
    assert metrics["final_test_acc"] > 0.6  # chance is 0.1
    assert metrics["parameters"] == 18458 and len(metrics["epochs"]) == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final_test_acc"] == metrics["final_test_acc"]
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(ckpt) >= {"state_dict", "model_kwargs"}


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


def test_interrupt_then_resume_equals_uninterrupted_run(mnist_dir, tmp_path, monkeypatch):
    whole = train(tiny(mnist_dir, tmp_path / "whole"), log=quiet)
    interrupt_at_step(monkeypatch, 11)  # inside the second epoch
    with pytest.raises(TrainingStopped, match=r"fastmnist train --resume .*cut"):
        train(tiny(mnist_dir, tmp_path / "cut"), log=quiet)
    state = checkpoint.load_training_state(tmp_path / "cut")
    assert (state["epoch"], state["step"], state["kind"]) == (1, 3, "interrupted")
    monkeypatch.undo()
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), progress=False), resume=True, log=quiet)
    assert comparable(resumed) == comparable(whole)
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


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
    state = checkpoint.load_training_state(tmp_path / "run")
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_existing_run_is_not_replaced(mnist_dir, tmp_path):
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    with pytest.raises(checkpoint.RunExistsError, match="--resume .* --overwrite"):
        train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), overwrite=True, log=quiet)


def test_resuming_a_checkpoint_of_another_layout_says_what_to_do(mnist_dir, tmp_path):
    """A checkpoint whose keys are another version's (v1 had separate Dropout2d layers) is refused in one line."""
    train(tiny(mnist_dir, tmp_path / "run", epochs=1), log=quiet)
    state = checkpoint.load_training_state(tmp_path / "run")
    state["model"] = {f"9{k}": v for k, v in state["model"].items()}
    checkpoint.save_training_state(tmp_path / "run", state)
    with pytest.raises(checkpoint.CheckpointError, match="another fastmnist version.*--overwrite"):
        train(tiny(mnist_dir, tmp_path / "run", epochs=2), resume=True, log=quiet)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.torch_save_atomic({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.torch_save_atomic({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
