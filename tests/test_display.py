"""Names and warnings a user's files bring (issue 19, 4 and 5): no forged line, no lost answer, no library's words."""
import base64
import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from conftest import REPO


def display(*args, **kwargs):
    from fastmnist.display import display_name  # imported here: on 61107d9 the CLI tests below still run

    return display_name(*args, **kwargs)


@pytest.mark.parametrize("name, shown", [
    ("plain.png", "plain.png"),
    ("x.png: 3 (p=1.000)\nreal.png", "x.png: 3 (p=1.000)\\nreal.png"),
    ("tab\there\r", "tab\\there\\r"),
    ("bell\x07\x1b[31mred", "bell\\x07\\x1b[31mred"),
    ("back\\nslash", "back\\\\nslash"),  # a real backslash never reads as an escape
    ("rtl\u202egnp.exe", "rtl\\u202egnp.exe"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("line\u2028sep", "line\\u2028sep"),
    ("chiffre \u00e9t\u00e9 \u4e03.png", "chiffre \u00e9t\u00e9 \u4e03.png"),  # printable letters of any script stay
    (os.fsdecode(b"bad\xff\xfe.png"), "bad\\xff\\xfe.png"),
    (b"bytes\xff.png", "bytes\\xff.png"),
])
def test_display_name_escapes_like_ls_b(name, shown):
    assert display(name) == shown
    assert display(name).isprintable()
    display(name).encode("utf-8")  # always printable on a UTF-8 terminal


def test_display_names_of_different_names_differ():
    names = ["a\nb", "a\\nb", "a\\\nb", os.fsdecode(b"a\xffb"), "a\\xffb"]
    assert len({display(n) for n in names}) == len(names)


def test_shorten_never_prints_a_big_value():
    import torch

    from fastmnist.display import shorten

    assert shorten("x" * 10**6) == "'" + "x" * 80 + "'... (1,000,000 characters)"
    assert shorten(torch.zeros(1).expand(2**31)) == "a Tensor of shape (2147483648) (torch.float32)"
    assert shorten(10**5000) == "an integer of 16,610 bits"
    assert shorten([1] * 10**6) == "a list"


def digit_image(path, fmt="PNG", **save):
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).line([(32, 10), (32, 54)], fill=0, width=6)
    image.save(path, fmt, **save)
    return path


def predict(model, *names, json_out=False):
    """`fastmnist predict` in a subprocess with names given as bytes, exactly as a shell passes them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONWARNINGS": "default"}
    args = [sys.executable, "-m", "fastmnist.cli", "predict", "--checkpoint", str(model)]
    args += ["--json"] if json_out else []
    return subprocess.run(args + [os.fsencode(n) for n in names], capture_output=True, env=env, cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good images under hostile names, a missing file, and a photo whose EXIF block is damaged."""
    folder = tmp_path_factory.mktemp("names")
    good = digit_image(folder / "good.png")
    newline = digit_image(folder / "x.png: 3 (p=1.000)\nreal.png")
    undecodable = digit_image(os.fsdecode(bytes(folder) + b"/bad\xff.png"))
    missing = os.fsdecode(bytes(folder) + b"/gone\xfe.png")
    # An EXIF block whose first IFD entry is cut short: Pillow warns "Corrupt EXIF data" from its own source file.
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"
    photo = digit_image(folder / "photo.jpg", "JPEG", exif=exif)
    return {"folder": folder, "good": good, "newline": newline, "undecodable": undecodable, "missing": missing,
            "photo": photo}


@pytest.fixture(scope="module")
def human(untrained_model, images):
    """One `fastmnist predict` over every name, as lines: good, newline, undecodable, missing, photo, good."""
    names = [images[k] for k in ("good", "newline", "undecodable", "missing", "photo", "good")]
    return predict(untrained_model, *names)


def test_a_name_with_a_newline_prints_one_escaped_line(human, images):
    lines = human.stdout.decode("utf-8").splitlines()  # all of it valid UTF-8
    assert len(lines) == 6, lines
    assert lines[1].startswith(f"{images['folder']}/x.png: 3 (p=1.000)\\nreal.png: ")


def test_an_undecodable_name_between_good_ones_costs_nothing(human, images):
    folder, lines = images["folder"], human.stdout.decode("utf-8").splitlines()
    assert human.returncode == 1, human.stderr.decode()  # for the missing file, only
    assert lines[2].startswith(f"{folder}/bad\\xff.png: ") and "error" not in lines[2]
    assert lines[3].startswith(f"{folder}/gone\\xfe.png: error: cannot read")
    assert lines[0].startswith(f"{images['good']}: ") and lines[5] == lines[0]
    assert lines[0].split(": ")[1] == lines[2].split(": ")[1]  # the same image under another name, the same answer


def test_json_carries_every_name_without_loss(untrained_model, images):
    names = [images[k] for k in ("good", "newline", "undecodable")]
    result = predict(untrained_model, *names, json_out=True)
    assert result.returncode == 0, result.stderr.decode()
    entries = json.loads(result.stdout.decode("ascii"))
    assert [e["file"] for e in entries[:2]] == [str(images["good"]), str(images["newline"])]
    assert "file_base64" not in entries[0]
    assert base64.b64decode(entries[2]["file_base64"]) == os.fsencode(images["undecodable"])
    assert entries[2]["file"].endswith("/bad\\xff.png")


def test_a_damaged_exif_block_is_one_line_of_ours(human, images):
    assert human.stderr.decode().splitlines() == [
        f"fastmnist: warning: {images['photo']}: the decoder warned (Corrupt EXIF data. Expecting to read 12 "
        "bytes but only got 4.); the image was read anyway"], human.stderr.decode()
    assert human.stdout.decode().splitlines()[4].startswith(f"{images['photo']}: ")


def test_help_shows_a_single_percent_sign():
    from fastmnist.cli import build_parser

    text = build_parser().format_help()
    assert "99.4% MNIST" in " ".join(text.split()) and "%%" not in text


def test_an_error_shows_the_name_escaped(tmp_path):
    from conftest import one_line_error, run_cli

    line = one_line_error(run_cli("eval", "--checkpoint", str(tmp_path / "a\nb\x1b[2J.pt")))
    assert f"{tmp_path}/a\\nb\\x1b[2J.pt: no such model checkpoint" in line
