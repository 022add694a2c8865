"""predict: real MNIST digits turned into "user photos" must come back as MNIST digits."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import one_thread, run_cli
from fastmnist.predict import ImageError, load_digit, predict_files

N_PHOTOS = 20


@pytest.fixture(scope="module")
def checkpoint(mnist_dir, tmp_path_factory):
    """A model trained briefly (94 steps, ~10 s on one core; 96% test accuracy), trained once."""
    from fastmnist.train import TrainConfig, train

    out = tmp_path_factory.mktemp("predict") / "run"
    with one_thread():
        train(TrainConfig(epochs=2, limit_train=6000, limit_test=500, data_dir=mnist_dir, out=str(out),
                          progress=False, impl="stock"), log=lambda *a: None)
    return out / "model.pt"


def as_photo(digit_u8, margins=(17, 31, 9, 23), light=True):
    """An MNIST digit as a user might photograph it: 4x larger, off-centre, dark ink on grey paper."""
    big = F.interpolate(digit_u8[None, None].float(), scale_factor=4, mode="bilinear")[0]
    top, bottom, left, right = margins
    big = F.pad(big, (left, right, top, bottom))  # (1, 112 + top + bottom, 112 + left + right)
    ink = big.clamp(0, 255) / 255
    image = 235 - 200 * ink if light else 20 + 200 * ink
    return image.round().to(torch.uint8)


def write_image(gray, path, **kw):
    """A (1, H, W) uint8 tensor saved as an 8-bit grey image, its format from the file name (Pillow:
    torchvision.io's encoders warn that they are going away)."""
    Image.fromarray(gray[0].numpy(), "L").save(path, **kw)


def save_photos(mnist, folder, count, fmt="png", light=True):
    """count test digits saved as photos; returns (paths, labels)."""
    data = mnist
    paths = []
    for i in range(count):
        margins = (5 + 3 * i % 40, 11 + 7 * i % 30, 2 + 5 * i % 25, 13 + 2 * i % 35)
        photo = as_photo(data.test_images[i], margins, light)
        path = Path(folder) / f"digit{i}.{fmt}"
        write_image(photo, path, quality=85)
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
        scores.append(correlation(digit, mnist.test_images[i]))
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
    write_image(torch.full((1, 50, 40), 240, dtype=torch.uint8), blank)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, words in [(blank, "no digit found"), (text, "not a readable"), (empty, "empty"),
                        (tmp_path / "missing.png", "cannot read"), (tmp_path, "cannot read")]:
        with pytest.raises(ImageError, match=words) as info:
            load_digit(path)
        assert str(path) in str(info.value)


@pytest.mark.slow  # the checkpoint fixture trains a model
def test_predict_classifies_user_photos(mnist, checkpoint, tmp_path):
    paths, labels = save_photos(mnist, tmp_path, N_PHOTOS)
    results = predict_files(checkpoint, paths, device="cpu")
    assert [r["file"] for r in results] == paths
    assert all(0 <= r["probability"] <= 1 and isinstance(r["digit"], int) for r in results)
    correct = sum(r["digit"] == y for r, y in zip(results, labels))
    assert correct >= 16, (correct, [r["digit"] for r in results], labels)


def is_answer(result):
    """A classification, whichever digit a model with random weights picks."""
    return result["digit"] in range(10) and 0 <= result["probability"] <= 1


def test_bad_files_fail_alone(mnist, untrained_model, tmp_path):
    (good0, good1), _ = save_photos(mnist, tmp_path, 2)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    results = predict_files(untrained_model, [good0, str(text), str(empty), good1], device="cpu")
    assert [("error" in r) for r in results] == [False, True, True, False]
    assert "not a readable image" in results[1]["error"] and "empty" in results[2]["error"]
    assert is_answer(results[0]) and is_answer(results[3])


def test_cli_predict_exit_codes_and_json(mnist, untrained_model, tmp_path):
    paths, _ = save_photos(mnist, tmp_path, 3)
    ok = run_cli("predict", "--checkpoint", str(untrained_model), "--device", "cpu", *paths)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("(p=") == 3

    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    mixed = run_cli("predict", "--checkpoint", str(untrained_model), "--json", "--device", "cpu", paths[0], str(bad))
    assert mixed.returncode == 1, mixed.stderr
    results = json.loads(mixed.stdout)
    assert results[0]["file"] == paths[0] and is_answer(results[0])
    assert results[1]["file"] == str(bad) and "error" in results[1]


def test_cli_predict_missing_checkpoint_is_one_line(tmp_path):
    image = tmp_path / "x.png"
    write_image(torch.zeros(1, 28, 28, dtype=torch.uint8), image)
    result = run_cli("predict", "--checkpoint", str(tmp_path / "nope.pt"), str(image))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error: ") and "nope.pt" in lines[0]


# Hostile and broken files: each gets its own error line, nothing crashes, blocks or exhausts memory.

def seven(height=120, width=100):
    """A synthetic 7 (bright ink on black, float in [0, 1]): asymmetric, so a wrong rotation shows."""
    ink = torch.zeros(height, width)
    ink[20:32, 20:80] = 1.0  # the bar
    for row in range(32, 100):  # the stem, down and to the left
        col = 80 - (row - 32) * 40 // 68
        ink[row, col - 6 : col + 6] = 1.0
    return ink


def save_gray(ink, path, light=True, **pillow_kw):
    """ink in [0, 1] as dark-on-light (or light-on-dark) 8-bit grey, written by Pillow."""

    values = (235 - 200 * ink) if light else (20 + 200 * ink)
    Image.fromarray(values.round().to(torch.uint8).numpy(), "L").save(path, **pillow_kw)
    return str(path)


def png_bytes(width, height, rows, depth=8, color=0):
    """A PNG whose IHDR says width x height but whose data holds only `rows` rows (CRCs valid)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes([200]) * width for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


@pytest.mark.timeout(120)
def test_a_png_with_fewer_rows_than_its_header_crashes_nothing(untrained_model, tmp_path):
    """torchvision's PNG decoder died with SIGSEGV on this 72-byte file, taking every answer with it."""
    good0, good1 = save_gray(seven(), tmp_path / "a.png"), save_gray(seven(130, 140), tmp_path / "b.png")
    short = tmp_path / "short.png"
    short.write_bytes(png_bytes(64, 64, rows=2))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(30000, 30000, rows=1))
    result = run_cli("predict", "--checkpoint", str(untrained_model), "--json", "--device", "cpu",
                     good0, str(short), str(bomb), good1, timeout=100)
    assert result.returncode in (0, 1), (result.returncode, result.stderr)  # not killed by a signal
    results = json.loads(result.stdout)
    assert [r["file"] for r in results] == [good0, str(short), str(bomb), good1]
    assert "digit" in results[0] and "digit" in results[3]
    assert "ends before the last row" in results[1]["error"]
    assert "40 megapixels" in results[2]["error"]


def adam7_png(pixels, interlace, cut=0):
    """An 8-bit grey PNG of pixels, Adam7-interlaced or not, its inflated data cut short by `cut` bytes."""
    import struct
    import zlib

    from fastmnist.predict import ADAM7

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes(row.tolist()) for x0, y0, dx, dy in (ADAM7 if interlace else ((0, 0, 1, 1),))
                   for row in pixels[y0::dy, x0::dx] if row.numel())
    height, width = pixels.shape
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace))
            + chunk(b"IDAT", zlib.compress(raw[: len(raw) - cut])) + chunk(b"IEND", b""))


@pytest.mark.parametrize("interlace", [0, 1], ids=["plain", "adam7"])
@pytest.mark.parametrize("height, width", [(120, 100), (13, 29), (3, 5)])
def test_a_png_missing_its_last_bytes_is_an_error_not_a_guess(tmp_path, interlace, height, width):
    """Pillow fills rows a short deflate stream lacks with black: the digit read from it would be a guess."""
    pixels = (235 - 200 * F.interpolate(seven()[None, None], size=(height, width))[0, 0]).round().to(torch.uint8)
    whole, cut = tmp_path / "whole.png", tmp_path / "cut.png"
    whole.write_bytes(adam7_png(pixels, interlace))
    cut.write_bytes(adam7_png(pixels, interlace, cut=1))
    try:
        load_digit(whole)  # complete: a digit, or (for the tiniest) no digit, but never "ends before"
    except ImageError as exc:
        assert "ends before" not in exc.reason
    with pytest.raises(ImageError, match="the image data ends before the last row its header promises"):
        load_digit(cut)


@pytest.mark.parametrize("side, words", [(7000, "7000x7000 pixels, over the limit of 40 megapixels"),
                                         (30000, "over the limit of 40 megapixels")])  # Pillow's guard sees it first
def test_the_pixel_count_is_checked_from_the_header_before_decoding(tmp_path, side, words):
    """In a subprocess: the decoder this replaced crashed on such a file. Decoding it whole fails the test."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(side, side, rows=1))  # 49 or 900 megapixels in 80 bytes
    code = ("import sys; from PIL import ImageFile; from fastmnist.predict import ImageError, load_digit\n"
            "ImageFile.ImageFile.load = lambda self: sys.exit('decoded the whole image')\n"
            "try:\n    load_digit(sys.argv[1])\nexcept ImageError as exc:\n    print(exc.reason)\n")
    result = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)})
    assert result.returncode == 0 and words in result.stdout, (result.returncode, result.stdout, result.stderr)


def test_a_file_over_the_size_limit_is_not_read(tmp_path, monkeypatch):
    import fastmnist.predict as predict

    path = save_gray(seven(), tmp_path / "seven.png")
    monkeypatch.setattr(predict, "MAX_FILE_BYTES", 100)
    with pytest.raises(ImageError, match=r"bytes, over the limit of 100 bytes"):
        load_digit(path)


@pytest.mark.timeout(30)
def test_only_regular_files_are_read(tmp_path):
    """A FIFO blocked forever and /dev/zero exhausted memory: both are refused without reading."""
    fifo = tmp_path / "image.png"
    __import__("os").mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ImageError, match="not a regular file"):
            load_digit(path)


def test_exif_orientation_is_applied(tmp_path):
    """An upright 7 photographed upside down (EXIF orientation 3) is read as the upright 7."""

    upright = load_digit(save_gray(seven(), tmp_path / "upright.png"))
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotate 180 to view
    stored = save_gray(seven().flip(0, 1), tmp_path / "photo.jpg", exif=exif, quality=95)
    photo = load_digit(stored)
    assert correlation(photo, upright) > 0.9
    assert correlation(photo, upright.flip(1, 2)) < correlation(photo, upright)


@pytest.mark.parametrize("ink_value", [0, 255], ids=["black_ink", "white_ink"])
def test_transparency_is_composited_onto_the_background_it_implies(tmp_path, ink_value):
    """Ink drawn on a transparent background (a drawing app's export) is a digit, not a blank image."""

    ink = seven()
    rgba = torch.zeros(*ink.shape, 4, dtype=torch.uint8)  # transparent black everywhere...
    rgba[..., :3] = ink_value
    rgba[..., 3] = (ink * 255).to(torch.uint8)  # ...except the ink, opaque
    path = tmp_path / "drawing.png"
    Image.fromarray(rgba.numpy(), "RGBA").save(path)
    opaque = load_digit(save_gray(ink, tmp_path / "paper.png", light=ink_value == 0))
    assert correlation(load_digit(path), opaque) > 0.99


def test_16_bit_greyscale_keeps_its_levels(tmp_path):

    ink = seven()
    path = tmp_path / "deep.png"
    Image.fromarray((ink * 60000 + 2000).round().to(torch.int32).numpy().astype("uint16")).save(path)
    eight_bit = load_digit(save_gray(ink, tmp_path / "eight.png", light=False))
    assert correlation(load_digit(path), eight_bit) > 0.99


def test_decode_errors_name_no_build_paths(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes(10, 10, rows=10)[:40])  # cut inside the image data
    with pytest.raises(ImageError) as info:
        load_digit(bad)
    assert ".cpp" not in info.value.reason and "/" not in info.value.reason and "0x" not in info.value.reason


def test_any_failure_of_one_file_leaves_the_others_their_answers(untrained_model, tmp_path, monkeypatch):
    import fastmnist.predict as predict

    good, doomed = save_gray(seven(), tmp_path / "good.png"), save_gray(seven(), tmp_path / "doomed.png")
    original = predict.load_digit

    def flaky(path, notes=None):
        if Path(path) == Path(doomed):
            raise MemoryError("the decoder ran out of memory")
        return original(path, notes)

    monkeypatch.setattr(predict, "load_digit", flaky)
    results = predict_files(untrained_model, [doomed, good], device="cpu")
    assert "MemoryError" in results[0]["error"] and isinstance(results[1]["digit"], int)


def nan_model(untrained_model, tmp_path):
    ckpt = torch.load(untrained_model, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][key][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return path


def test_a_model_with_nan_weights_is_reported_as_broken(untrained_model, tmp_path):
    path = nan_model(untrained_model, tmp_path)
    image = save_gray(seven(), tmp_path / "seven.png")
    for args in (["eval", "--checkpoint", str(path)], ["predict", "--json", "--checkpoint", str(path), image]):
        result = run_cli(*args, "--device", "cpu")
        assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastmnist: error: ") and "NaN" in lines[0], lines


def test_non_finite_output_is_an_error_never_a_nan_probability(untrained_model, tmp_path, monkeypatch):

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    import fastmnist.api as api  # predict_files runs its model through fastmnist.load's Classifier

    monkeypatch.setattr(api, "load_model", lambda path, device: (Broken(), {}))
    results = predict_files(untrained_model, [save_gray(seven(), tmp_path / "seven.png")], device="cpu")
    assert "not finite" in results[0]["error"] and "probability" not in results[0]
    json.dumps(results, allow_nan=False)  # valid JSON


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status (Linux)")
def test_a_40_megapixel_image_costs_at_most_its_decoded_size(tmp_path):
    """The README's bound: an image at MAX_PIXELS adds about 4 bytes a pixel (160 MB) to predict's memory.

    Measured as the peak resident memory while decoding each, less the resident memory before, in one
    process that has already classified a small image. On 61107d9 the sideways JPEG added ~300 MB (a full-size
    RGB copy to turn it, another to grey it) and the RGBA PNG ~480 MB (full-size copies to composite).
    """
    from fastmnist.predict import MAX_PIXELS

    width = 7300
    height = MAX_PIXELS // width
    photo = Image.new("RGB", (width, height), (250, 250, 240))
    ImageDraw.Draw(photo).line([(width // 2, 500), (width // 2, height - 500)], fill=(10, 10, 60), width=300)
    exif = Image.Exif()
    exif[0x0112] = 6  # taken sideways: turned upright before classifying
    photo.save(tmp_path / "sideways.jpg", quality=80, exif=exif.tobytes())
    drawing = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(drawing).line([(width // 2, 500), (width // 2, height - 500)], fill=(0, 0, 0, 255), width=300)
    drawing.save(tmp_path / "drawing.png")
    del photo, drawing
    save_gray(seven(), tmp_path / "small.png")
    # Linux: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current resident size.
    code = ("import sys\nfrom fastmnist.predict import load_digit\n"
            "def kb(key):\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
            "load_digit(sys.argv[1])\n"
            "for path in sys.argv[2:]:\n"
            "    open('/proc/self/clear_refs', 'w').write('5')\n"
            "    before = kb('VmRSS')\n"
            "    load_digit(path)\n"
            "    print((kb('VmHWM') - before) // 1024)\n")
    paths = [str(tmp_path / n) for n in ("small.png", "sideways.jpg", "drawing.png")]
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_mb = [int(x) for x in result.stdout.split()]
    # One RGBA decode (4 bytes a pixel, 152.6 MiB), the decoder's buffers and strips of a few MB: no full-size copy.
    assert max(growth_mb) <= 1.5 * 4 * MAX_PIXELS / 2**20, growth_mb
