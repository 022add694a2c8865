"""predict: real MNIST digits turned into "user photos" must come back as MNIST digits."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg, write_file, write_png

from conftest import run_cli
from fastmnist.predict import ImageError, load_digit, predict_files

N_PHOTOS = 20


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    """Real MNIST (conftest's mnist_dir finds or fetches it): these tests need real digits."""
    from fastmnist.data import load_mnist

    return mnist_dir, load_mnist(mnist_dir, download=False)


@pytest.fixture(scope="module")
def checkpoint(mnist, tmp_path_factory):
    """A model trained briefly (94 steps, ~10 s on one core; 96% test accuracy), trained once."""
    from fastmnist.train import TrainConfig, train

    out = tmp_path_factory.mktemp("predict") / "run"
    # One thread: this net is too small to gain from more, and on a busy shared machine idle
    # threads spin (measured: 93 s with 2 threads at load 4 on 2 cores, 10 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(epochs=2, limit_train=6000, limit_test=500, data_dir=mnist[0], out=str(out),
                          progress=False, impl="stock"), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out / "model.pt"


def as_photo(digit_u8, margins=(17, 31, 9, 23), light=True):
    """An MNIST digit as a user might photograph it: 4x larger, off-centre, dark ink on grey paper."""
    big = F.interpolate(digit_u8[None, None].float(), scale_factor=4, mode="bilinear")[0]
    top, bottom, left, right = margins
    big = F.pad(big, (left, right, top, bottom))  # (1, 112 + top + bottom, 112 + left + right)
    ink = big.clamp(0, 255) / 255
    image = 235 - 200 * ink if light else 20 + 200 * ink
    return image.round().to(torch.uint8)


def save_photos(mnist, folder, count, fmt="png", light=True):
    """count test digits saved as photos; returns (paths, labels)."""
    data = mnist[1]
    paths = []
    for i in range(count):
        margins = (5 + 3 * i % 40, 11 + 7 * i % 30, 2 + 5 * i % 25, 13 + 2 * i % 35)
        photo = as_photo(data.test_images[i], margins, light)
        path = Path(folder) / f"digit{i}.{fmt}"
        if fmt == "png":
            write_png(photo, str(path))
        else:
            write_file(str(path), encode_jpeg(photo, quality=85))
        paths.append(str(path))
    return paths, data.test_labels[:count].tolist()


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1].item()


@pytest.mark.parametrize("fmt, light", [("png", True), ("png", False), ("jpg", True)])
def test_load_digit_recovers_the_mnist_digit(mnist, tmp_path, fmt, light):
    paths, _ = save_photos(mnist, tmp_path, 10, fmt, light)
    scores = []
    for i, path in enumerate(paths):
        digit = load_digit(path)
        assert digit.shape == (1, 28, 28) and digit.dtype == torch.float32
        assert digit.min() >= 0 and digit.max() <= 1
        scores.append(correlation(digit, mnist[1].test_images[i]))
    # A centre of mass near a half pixel may round the other way than MNIST's did: a 1 px
    # shift costs ~0.2 of correlation (300 digits: median 0.96, min 0.75), hence two bounds.
    assert min(scores) > 0.7 and sum(scores) / len(scores) > 0.9, scores


def test_load_digit_centres_by_mass_like_mnist(mnist, tmp_path):
    (path,), _ = save_photos(mnist, tmp_path, 1)
    digit = load_digit(path)[0]
    idx = torch.arange(28.0)
    cy = (digit.sum(1) * idx).sum() / digit.sum()
    cx = (digit.sum(0) * idx).sum() / digit.sum()
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6
    rows, cols = (digit > 0.1).any(1).sum(), (digit > 0.1).any(0).sum()
    assert max(rows, cols) <= 21


def test_blank_and_unreadable_files_raise_naming_the_file(tmp_path):
    blank = tmp_path / "blank.png"
    write_png(torch.full((1, 50, 40), 240, dtype=torch.uint8), str(blank))
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, words in [(blank, "no digit found"), (text, "not a readable"), (empty, "empty"),
                        (tmp_path / "missing.png", "cannot read"), (tmp_path, "cannot read")]:
        with pytest.raises(ImageError, match=words) as info:
            load_digit(path)
        assert str(path) in str(info.value)


def test_predict_classifies_user_photos(mnist, checkpoint, tmp_path):
    paths, labels = save_photos(mnist, tmp_path, N_PHOTOS)
    results = predict_files(checkpoint, paths, device="cpu")
    assert [r["file"] for r in results] == paths
    assert all(0 <= r["probability"] <= 1 and isinstance(r["digit"], int) for r in results)
    correct = sum(r["digit"] == y for r, y in zip(results, labels))
    assert correct >= 16, (correct, [r["digit"] for r in results], labels)


def test_bad_files_fail_alone(mnist, checkpoint, tmp_path):
    (good0, good1), labels = save_photos(mnist, tmp_path, 2)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    results = predict_files(checkpoint, [good0, str(text), str(empty), good1], device="cpu")
    assert [("error" in r) for r in results] == [False, True, True, False]
    assert "not a readable image" in results[1]["error"] and "empty" in results[2]["error"]
    assert [results[0]["digit"], results[3]["digit"]] == labels


def test_cli_predict_exit_codes_and_json(mnist, checkpoint, tmp_path):
    paths, labels = save_photos(mnist, tmp_path, 3)
    ok = run_cli("predict", "--checkpoint", str(checkpoint), "--device", "cpu", *paths)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("(p=") == 3

    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    mixed = run_cli("predict", "--checkpoint", str(checkpoint), "--json", "--device", "cpu", paths[0], str(bad))
    assert mixed.returncode == 1, mixed.stderr
    results = json.loads(mixed.stdout)
    assert results[0]["file"] == paths[0] and results[0]["digit"] == labels[0]
    assert results[1]["file"] == str(bad) and "error" in results[1]


def test_cli_predict_missing_checkpoint_is_one_line(tmp_path):
    image = tmp_path / "x.png"
    write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    result = run_cli("predict", "--checkpoint", str(tmp_path / "nope.pt"), str(image))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error: ") and "nope.pt" in lines[0]
