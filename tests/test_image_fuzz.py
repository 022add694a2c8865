"""Fuzz load_digit: any bytes give a (1, 28, 28) digit in [0, 1] or an ImageError naming the file.

The files predict reads may be a stranger's. Whatever their bytes (random,
mutated or cut copies of valid PNG, JPEG, GIF, BMP and WebP files, PNG headers
claiming any size), nothing may crash the process, allocate what a header
claims, or raise anything but ImageError: any other exception is a bug.
"""
import io
import multiprocessing
import random
import struct
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastmnist.predict import ImageError, load_digit

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A crash respawns the worker (seconds) for every example hypothesis then shrinks: bound the whole test.
pytestmark = pytest.mark.timeout(300)
FOLDER = Path(tempfile.mkdtemp(prefix="fastmnist-image-fuzz-"))


def sample_image(mode):
    """A small light-on-dark stroke, in the given Pillow mode."""
    pixels = torch.zeros(24, 20, dtype=torch.uint8)
    pixels[4:20, 9:12] = 220
    pixels[4:7, 5:15] = 220
    image = Image.fromarray(pixels.numpy(), "L")
    return image.convert(mode) if mode != "L" else image


def encoded(fmt, mode):
    buffer = io.BytesIO()
    sample_image(mode).save(buffer, fmt)
    return buffer.getvalue()


def transparent(fmt):
    """The stroke as ink on a transparent background (a palette with a transparent index for GIF)."""
    buffer = io.BytesIO()
    image = sample_image("L")
    if fmt == "GIF":
        image.convert("P").save(buffer, fmt, transparency=0)
    else:
        image.convert("LA").save(buffer, fmt)
    return buffer.getvalue()


SEEDS = [encoded("PNG", "L"), encoded("PNG", "RGBA"), encoded("PNG", "P"), encoded("JPEG", "L"),
         encoded("JPEG", "RGB"), encoded("GIF", "L"), encoded("BMP", "RGB"), encoded("WEBP", "RGB"),
         transparent("PNG"), transparent("GIF")]


class Decoder:
    """load_digit in a worker process: a decoder that crashes fails one example, not the whole test run."""

    def __init__(self):
        self.pool = None

    def __call__(self, path):
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self.pool.submit(load_digit, path).result(timeout=120)
        except BrokenProcessPool:
            self.pool = None  # the next example gets a fresh worker
            pytest.fail(f"decoding {path} crashed the process (a signal such as SIGSEGV)")


DECODE = Decoder()


def check_contract(data: bytes):
    """load_digit's result on a file holding data, asserting the contract."""
    path = FOLDER / "fuzz.img"
    path.write_bytes(data)
    try:
        digit = DECODE(path)
    except ImageError as exc:
        assert str(path) in str(exc) and exc.reason and "\n" not in exc.reason
        return None
    assert digit.shape == (1, 28, 28) and digit.dtype == torch.float32
    assert torch.isfinite(digit).all() and digit.min() >= 0 and digit.max() <= 1
    return digit


def test_the_seeds_are_digits():
    for data in SEEDS:
        assert check_contract(data) is not None


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data):
    check_contract(data)


@FUZZ
@given(which=st.sampled_from(range(len(SEEDS))), seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 12))
def test_mutated_images(which, seed, flips):
    data = bytearray(SEEDS[which])
    rng = random.Random(seed)
    for _ in range(flips):
        data[rng.randrange(len(data))] = rng.randrange(256)
    check_contract(bytes(data))


@FUZZ
@given(which=st.sampled_from(range(len(SEEDS))), cut=st.floats(0.0, 1.0))
def test_truncated_images(which, cut):
    data = SEEDS[which]
    check_contract(data[: int(len(data) * cut)])


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@FUZZ
@given(width=st.sampled_from([0, 1, 7, 28, 4096, 65535, 2**31 - 1, 2**32 - 1]),
       height=st.sampled_from([0, 1, 5, 28, 4096, 65535, 2**31 - 1, 2**32 - 1]),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3]), color=st.sampled_from([0, 2, 3, 4, 6, 5]),
       interlace=st.sampled_from([0, 1]), body=st.binary(max_size=512))
def test_png_headers_claiming_any_size(width, height, depth, color, interlace, body):
    """Valid CRCs, so the decoder trusts the header: the pixel limit must stop the large ones unread."""
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))
            + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))
    check_contract(data)


@pytest.mark.timeout(120)
def test_a_lying_header_is_refused_without_decoding():
    """A 65535 x 65535 PNG of 100 bytes: refused from the header (16 GB if decoded)."""
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 65535, 65535, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    path = FOLDER / "lying.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="megapixels"):
        DECODE(path)
