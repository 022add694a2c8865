"""fastmnist export: a checked ONNX (or .pt2) file that other runtimes classify exactly as our model does."""
import re
import subprocess
import sys

import pytest
import torch

import fastmnist
from conftest import briefly_trained_run, one_line_error, run_cli
from fastmnist import export as export_module
from fastmnist.export import OPSET, ExportError, export

onnx = pytest.importorskip("onnx", reason="the `export` extra is not installed")

# Run in a fresh interpreter, reading MNIST's IDX files with numpy and the model with onnxruntime
# alone: what a user of the exported file has, none of fastmnist's code.
FRESH_ONNXRUNTIME = r"""
import sys, numpy as np, onnxruntime
images_path, labels_path, model_path = sys.argv[1:]
images = np.fromfile(images_path, np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
labels = np.fromfile(labels_path, np.uint8, offset=8)
session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
probs = np.concatenate([session.run(None, {"images": images[i:i + 2500]})[0] for i in range(0, len(images), 2500)])
print(int((probs.argmax(1) == labels).sum()), len(labels))
"""


@pytest.fixture(scope="module")
def run(mnist_dir, tmp_path_factory):
    return briefly_trained_run(tmp_path_factory, mnist_dir, "export")


@pytest.mark.slow  # trains a model and exports it
def test_onnxruntime_in_a_fresh_process_gets_exactly_evals_accuracy(run, mnist_dir, tmp_path):
    from fastmnist.data import locate_files

    out = tmp_path / "model.onnx"
    result = run_cli("export", str(run / "model.pt"), "-o", str(out), "--data-dir", mnist_dir)
    assert result.returncode == 0, result.stderr
    assert re.search(r"same digit on 10,000 of 10,000", result.stdout), result.stdout

    files = locate_files(mnist_dir)
    images, labels = files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"]
    if str(images).endswith(".gz") or str(labels).endswith(".gz"):
        pytest.skip("the fresh-process reader takes raw IDX files")
    fresh = subprocess.run([sys.executable, "-c", FRESH_ONNXRUNTIME, str(images), str(labels), str(out)],
                           capture_output=True, text=True, env={"PATH": ""}, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    correct, total = map(int, fresh.stdout.split())

    evaluated = run_cli("eval", "--checkpoint", str(run / "model.pt"), "--data-dir", mnist_dir, "--device", "cpu")
    printed = re.search(r"test accuracy ([\d.]+)%", evaluated.stdout)[1]
    assert f"{100 * correct / total:.2f}" == printed
    assert correct == fastmnist.evaluate(run, data_dir=mnist_dir, device="cpu")["correct"]

    model = onnx.load(out)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"} and not model.functions, domains
    assert {op.domain: op.version for op in model.opset_import}.get("", None) == OPSET
    batch = model.graph.input[0].type.tensor_type.shape.dim
    assert batch[0].dim_param and [d.dim_value for d in batch[1:]] == [1, 28, 28]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["parameters"] == "18410" and meta["fastmnist_version"] == fastmnist.__version__
    assert meta["test_accuracy"] == f"{correct / total:.4f}"


@pytest.mark.slow
def test_pt2_export_gives_the_same_digits(run, mnist_dir, tmp_path):
    clf = fastmnist.load(run, device="cpu")
    path = clf.export(tmp_path / "model.pt2", "pt2", data_dir=mnist_dir, log=lambda *a: None)
    module = torch.export.load(path).module()
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(module(x), clf.predict(x).probabilities, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_an_export_that_fails_its_check_writes_nothing(run, mnist_dir, tmp_path, monkeypatch):
    def wrong(path, images):  # an exporter bug: one image's classes swapped
        probs = torch.full((len(images), 10), 0.1)
        probs[0] = torch.tensor([1.0] + [0.0] * 9)
        return probs

    monkeypatch.setattr(export_module, "_onnxruntime_probabilities", wrong)
    with pytest.raises(ExportError, match="does not match the PyTorch model.*nothing was written"):
        export(run, tmp_path / "model.onnx", data_dir=mnist_dir, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_without_onnx_one_line_says_how_to_install(untrained_model, tmp_path, monkeypatch, capsys):
    from fastmnist.cli import main

    monkeypatch.setattr(export_module, "_importable", lambda name: name != "onnxruntime")
    assert main(["export", str(untrained_model), "-o", str(tmp_path / "m.onnx")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs onnxruntime" in lines[0] and "pip install 'fastmnist[export]'" in lines[0]


def test_bad_arguments_give_one_line_errors(untrained_model, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(untrained_model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ExportError, match="is a folder"):
        export(untrained_model, tmp_path)
    line = one_line_error(run_cli("export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")))
    assert "no such model checkpoint" in line
