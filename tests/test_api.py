"""The Python API: fastmnist.load -> Classifier.predict / preprocess, train, evaluate, and their errors."""
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmnist
import fastmnist.api
from conftest import briefly_trained_run
from fastmnist.api import InputError, images_to_batch, inference_model
from fastmnist.checkpoint import CheckpointError
from fastmnist.predict import ImageError, load_digit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    return briefly_trained_run(tmp_path_factory, mnist_dir, "api")


@pytest.fixture
def clf(untrained_model):
    return fastmnist.load(untrained_model, device="cpu")


def photo(digit_u8: torch.Tensor) -> Image.Image:
    """An MNIST digit as a user's drawing: 4x larger, off-centre, dark ink on light paper."""
    big = torch.nn.functional.interpolate(digit_u8[None, None].float(), scale_factor=4, mode="bilinear")[0, 0]
    big = torch.nn.functional.pad(big, (30, 10, 5, 25))
    return Image.fromarray((235 - 200 * big.clamp(0, 255) / 255).round().to(torch.uint8).numpy(), "L")


def test_the_package_lists_its_api_with_one_line_docstrings():
    for name in fastmnist.__all__:
        if name != "__version__":
            doc = getattr(fastmnist, name).__doc__
            assert doc and doc.strip().splitlines()[0], name
    text = subprocess.run([sys.executable, "-c", "import fastmnist; help(fastmnist)"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PAGER": "cat", "PATH": ""}).stdout
    for name in ("load", "train", "evaluate", "fuse", "Classifier", "InputError"):
        assert re.search(rf"^\s+{name}\(|^\s+class {name}\(", text, re.M), name


def test_every_kind_of_image_gives_the_same_batch(mnist, tmp_path):
    digits = mnist.test_images[:3]
    as_float = digits.float() / 255
    expected = as_float[:, None]
    for images in (digits, as_float, as_float[:, None], digits.numpy(), as_float.numpy().astype(np.float64),
                   [d for d in digits], [d.numpy() for d in digits]):
        torch.testing.assert_close(images_to_batch(images), expected, atol=0, rtol=0)
    assert images_to_batch(digits[0]).shape == (1, 1, 28, 28)


def test_photos_files_bytes_and_pil_images_go_through_predicts_preprocessing(mnist, tmp_path, clf):
    image = photo(mnist.test_images[0])
    path = tmp_path / "seven.png"
    image.save(path)
    expected = load_digit(path)[0]  # what `fastmnist predict` feeds the model
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    gray = torch.from_numpy(np.array(image)).float() / 255
    for item in (path, str(path), buffer.getvalue(), image, image.convert("RGB"), np.array(image), gray):
        torch.testing.assert_close(clf.preprocess(item), expected, atol=1e-6, rtol=0)
    # A 28x28 array is an MNIST digit as it is, unless asked to bring it to the convention,
    # which puts a digit moved off-centre back where MNIST has it (an MNIST digit is a fixed point).
    digit = mnist.test_images[0]
    moved = torch.nn.functional.pad(digit, (-2, 2, -2, 2))  # 2 pixels left and up: its margins are blank
    assert torch.equal(moved.roll((2, 2), (0, 1)), digit)
    assert torch.equal(clf.preprocess(moved), moved.float() / 255)
    torch.testing.assert_close(clf.preprocess(moved, mnist_style=False), digit.float() / 255, atol=1e-6, rtol=0)


def test_predict_returns_a_digit_and_ten_probabilities_per_image(clf, mnist):
    out = clf.predict(mnist.test_images[:5])
    assert out.digits.shape == (5,) and out.digits.dtype == torch.int64
    assert out.probabilities.shape == (5, 10)
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(5))
    assert torch.equal(out.digits, out.probabilities.argmax(1))


def test_ten_thousand_images_run_as_batches_not_one_by_one(clf, mnist):
    sizes = []
    clf.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    out = clf.predict(list(mnist.test_images))  # 10,000 separate tensors
    assert len(out.digits) == 10_000 and sizes == [1000] * 10


@pytest.mark.slow  # trains a model
def test_predict_on_the_test_set_gives_evals_accuracy_exactly(trained_run, mnist, mnist_dir):
    clf = fastmnist.load(trained_run, device="cpu")
    report = fastmnist.evaluate(trained_run, data_dir=mnist_dir, device="cpu")
    correct = (clf.predict(mnist.test_images).digits == mnist.test_labels).sum().item()
    assert correct == report["correct"] == round(report["test_acc"] * 10_000)
    assert clf.info.test_accuracy == report["test_acc"] > 0.9
    assert report["per_class"][7]["digit"] == 7 and len(report["confusion"]) == 10


@pytest.mark.slow
def test_the_model_card_names_the_model_and_its_accuracy(trained_run):
    info = fastmnist.load(trained_run / "model.pt", device="cpu").info
    assert (info.model, info.parameters, info.device) == ("default", 18410, "cpu")
    assert info.test_accuracy is not None and info.kernel_path and info.impl in ("fused", "stock")
    assert info.to_dict()["fastmnist_version"] == fastmnist.__version__


def test_without_metrics_json_the_card_has_no_accuracy(clf):
    assert clf.info.test_accuracy is None and clf.info.parameters == 18410


def test_the_stock_path_folds_bn_exactly(untrained_model):
    from fastmnist.model import build_model

    ckpt = torch.load(untrained_model, weights_only=True)
    model = build_model(**{**ckpt["model_kwargs"], "impl": "stock"})
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():  # random BN statistics, so that the fold has something to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    folded, was_folded = inference_model(model.eval(), "stock")
    assert was_folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
    assert inference_model(model, "fused") == (model, False)


# ---- bad input: one line, the package's own exception types --------------------------------------------

BAD_IMAGES = {
    "wrong shape": (np.zeros((3, 3, 3)), InputError, r"shape \(3, 3, 3\) is not an image"),
    "RGB array": (np.zeros((28, 28, 3), np.uint8), InputError, r"shape \(28, 28, 3\)"),
    "wrong dtype": (torch.zeros(28, 28, dtype=torch.int64), InputError, r"dtype torch.int64 is not an image type"),
    "bool": (np.zeros((28, 28), bool), InputError, "numpy dtype bool"),
    "NaN pixels": (torch.full((2, 28, 28), float("nan")), InputError, "NaN or infinite"),
    "0-255 floats": (torch.full((28, 28), 255.0), InputError, "divide by 255"),
    "negative": (torch.full((28, 28), -0.5), InputError, r"must be in \[0, 1\]"),
    "empty list": ([], InputError, "empty list"),
    "empty batch": (torch.zeros(0, 28, 28), InputError, "holds no pixels"),
    "missing file": ("/no/such/digit.png", ImageError, "cannot read"),
    "not an image": (b"hello", ImageError, "not a readable image"),
    "blank": (torch.zeros(40, 30), ImageError, "no digit found"),
    "a dict": ({"x": 1}, InputError, "a dict is not an image"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_give_one_line_errors_of_our_types(clf, case):
    images, kind, pattern = BAD_IMAGES[case]
    with pytest.raises(kind, match=pattern) as info:
        clf.predict(images)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, (InputError, ImageError)) and isinstance(InputError("x"), ValueError)


def test_the_bad_item_of_a_list_is_named(clf):
    with pytest.raises(InputError, match=r"^images\[1\]: dtype torch.int32"):
        clf.predict([torch.zeros(28, 28), torch.zeros(28, 28, dtype=torch.int32)])


def test_bad_models_give_one_line_checkpoint_errors(tmp_path, untrained_model):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}, "model_kwargs": {}, "format": "someone-elses-v1"}, foreign)
    (tmp_path / "empty_run").mkdir()
    for path, pattern in ((tmp_path / "missing.pt", "no such model checkpoint"),
                          (foreign, "saved in format 'someone-elses-v1'"),
                          (tmp_path / "empty_run", "no model.pt in this folder")):
        with pytest.raises(CheckpointError, match=pattern) as info:
            fastmnist.load(path, device="cpu")
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="device must be auto, cpu or cuda"):
        fastmnist.load(untrained_model, device="tpu")


def test_train_refuses_what_the_command_line_refuses_with_the_same_reason(tmp_path):
    for settings, pattern in (({"epochs": 0}, r"^epochs: 0 is out of range: must be >= 1"),
                              ({"lr": -1.0}, r"^lr: -1.0 is out of range: must be > 0.0"),
                              ({"model": "huge"}, r"^model: not one of the choices: 'huge'"),
                              ({"device": "tpu"}, r"^device: not one of the choices")):
        with pytest.raises(InputError, match=pattern) as info:
            fastmnist.train(tmp_path / "run", **settings)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="resume=True continues the run .* drop epochs"):
        fastmnist.train(tmp_path / "run", epochs=3, resume=True)
    assert not (tmp_path / "run").exists()


def test_fastmnist_train_stays_the_function_when_its_module_is_imported():
    import importlib

    module = importlib.import_module("fastmnist.train")
    from fastmnist import train

    assert train is fastmnist.train is fastmnist.api.train and module.TrainConfig


def test_evaluate_gives_one_line_errors(tmp_path, untrained_model):
    with pytest.raises(CheckpointError, match="no such model checkpoint"):
        fastmnist.evaluate(tmp_path / "missing.pt", device="cpu")
    with pytest.raises(InputError, match="device must be auto, cpu or cuda"):
        fastmnist.evaluate(untrained_model, device="tpu")


# ---- the README's Python session, run as written -----------------------------------------------------

def readme_session() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-session -->\s*```python\n(.*?)```\s*<!-- /python-session -->", text, re.S)
    assert block, "README.md has no ```python block between <!-- python-session --> and <!-- /python-session -->"
    return block[1]


@pytest.mark.slow  # trains one epoch on all 60,000 images and exports
def test_the_readme_python_session_runs_as_written(mnist_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="the session exports ONNX: the `export` extra")
    env = {"PATH": "", "HOME": str(tmp_path), "FASTMNIST_DATA": mnist_dir, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}  # one thread: on a busy shared machine more only spin
    result = subprocess.run([sys.executable, "-c", readme_session()], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("Classifier('runs/demo/model.pt': default, 18,410 parameters") for line in lines)
    accuracy = [line for line in lines if re.fullmatch(r"0\.\d+ torch.Size\(\[10000, 10\]\)", line)]
    assert accuracy and float(accuracy[0].split()[0]) == pytest.approx(float(lines[lines.index(accuracy[0]) + 1]))
    assert "[7, 7] torch.Size([28, 28])" in lines
    assert "  fused: 0 -> 1 -> 2 (conv_relu_bn)" in lines
    assert "  stock: 3: stride (2, 2): the fused ops run stride 1" in lines
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "runs/demo/metrics.json").is_file()
