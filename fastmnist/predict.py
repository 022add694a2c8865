"""Classify the user's own digit images, brought first to MNIST's convention.

MNIST's digits were made so (LeCun et al.): the digit is cropped to its
bounding box, scaled with anti-aliasing to fit a 20x20 box keeping its aspect
ratio, and placed in a 28x28 field so that its centre of mass lands on the
centre, pixel (14, 14); the ink is bright on a black background. load_digit
does the same to any PNG or JPEG, light-on-dark or dark-on-light.
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize, to_dtype

from fastmnist.checkpoint import load_model
from fastmnist.train import resolve_device

CANVAS = 28
BOX = 20  # the digit's longer side, as in MNIST
CENTRE = 14.0  # MNIST's mean centre of mass, in pixel indices, is (14.00, 14.00)
MIN_CONTRAST = 0.05  # ink less than 5% brighter than the background is not a digit
INK_FRACTION = 0.1  # pixels above this fraction of the brightest one bound the digit


class ImageError(Exception):
    """An image that cannot be read, decoded, or holds no digit; the message names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _decode_gray(path: Path) -> torch.Tensor:
    """(H, W) float in [0, 1] from an image file, via torchvision's decoders."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(path, "empty file")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)
    except RuntimeError as exc:
        raise ImageError(path, f"not a readable image ({_first_sentence(exc)})") from None
    if image.ndim == 4:  # an animated GIF: its first frame
        image = image[0]
    if image.numel() == 0:
        raise ImageError(path, "image has no pixels")
    return to_dtype(image[0], torch.float32, scale=True)  # 16-bit PNGs decode to uint16


def _first_sentence(exc: Exception) -> str:
    # torchvision prefixes its messages with "function, source.cpp:line, ": keep what follows.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text).split(". ")[0][:200]


def _border(image: torch.Tensor) -> torch.Tensor:
    return torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])


def _ink(image: torch.Tensor, path: Path) -> torch.Tensor:
    """Bright-on-black ink in [0, 1]: inverted when the border is light, background removed, max 1.

    The border is taken to be background: its median decides the polarity
    (dark-on-light paper is inverted) and is subtracted as the background level.
    """
    if _border(image).median() > 0.5:
        image = 1.0 - image
    ink = (image - _border(image).median()).clamp_(min=0.0)
    peak = ink.max()
    if peak < MIN_CONTRAST:
        raise ImageError(path, "no digit found (the image is blank or has too little contrast)")
    return ink / peak


def _fit_box(ink: torch.Tensor) -> torch.Tensor:
    """Crop to the ink's bounding box and scale its longer side to BOX, antialiased."""
    rows = (ink > INK_FRACTION).any(1).nonzero().flatten()
    cols = (ink > INK_FRACTION).any(0).nonzero().flatten()
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    digit = resize(crop[None], size, antialias=True)[0].clamp_(0.0, 1.0)
    # Shrinking thin strokes dims them: restore full brightness, as MNIST's digits have.
    return digit / digit.max()


def _centre_by_mass(digit: torch.Tensor) -> torch.Tensor:
    """Place digit in a CANVAS x CANVAS field with its centre of mass at (CENTRE, CENTRE).

    The shift is rounded to whole pixels, as MNIST's was (its centres of mass
    spread by 0.29 px, a uniform rounding error), so strokes are not blurred.
    """
    h, w = digit.shape
    mass = digit.sum()
    cy = (digit.sum(1) * torch.arange(h, dtype=digit.dtype)).sum() / mass
    cx = (digit.sum(0) * torch.arange(w, dtype=digit.dtype)).sum() / mass
    top, left = round(CENTRE - cy.item()), round(CENTRE - cx.item())
    # Pad by what lies inside the field and crop what falls outside (negative padding crops).
    return F.pad(digit, (left, CANVAS - left - w, top, CANVAS - top - h))


def load_digit(path) -> torch.Tensor:
    """An image file as a (1, 28, 28) float32 tensor in [0, 1], the way MNIST's digits look."""
    path = Path(path)
    ink = _ink(_decode_gray(path), path)
    return _centre_by_mass(_fit_box(ink)).clamp_(0.0, 1.0)[None].contiguous()


@torch.no_grad()
def predict_files(checkpoint_path, image_paths, device="auto") -> list:
    """Per file, {"file", "digit", "probability"} or {"file", "error"}, in the given order.

    A bad checkpoint raises CheckpointError; a bad image only fails its own entry.
    """
    device = resolve_device(device)
    model, _ = load_model(checkpoint_path, device)
    results, digits = [], []
    for name in image_paths:
        try:
            digits.append(load_digit(name))
            results.append({"file": str(name)})
        except ImageError as exc:
            results.append({"file": str(name), "error": exc.reason})  # the caller prints the file
    if digits:
        x = torch.stack(digits).to(device).contiguous(memory_format=torch.channels_last)
        probs = F.softmax(model(x).float(), dim=1).cpu()
        p, digit = probs.max(1)
        ok = (r for r in results if "error" not in r)
        for r, d, q in zip(ok, digit.tolist(), p.tolist()):
            r.update(digit=d, probability=q)
    return results
