"""Classify the user's own digit images, brought first to MNIST's convention.

MNIST's digits were made so (LeCun et al.): the digit is cropped to its
bounding box, scaled with anti-aliasing to fit a 20x20 box keeping its aspect
ratio, and placed in a 28x28 field so that its centre of mass lands on the
centre, pixel (14, 14); the ink is bright on a black background. load_digit
does the same to any PNG, JPEG, GIF, BMP or WebP, light-on-dark or dark-on-light.

The files may be a stranger's, so they are treated as hostile: only regular
files of at most MAX_FILE_BYTES are read, the pixel count is checked from the
header before anything is decoded, and Pillow decodes (it validates what it
reads: a truncated image is an error, never a crash).
"""
import io
import math
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageStat, UnidentifiedImageError
from torchvision.transforms.v2.functional import resize

from fastmnist.display import display_name
from fastmnist.errors import first_line

CANVAS = 28
BOX = 20  # the digit's longer side, as in MNIST
CENTRE = 14.0  # MNIST's mean centre of mass, in pixel indices, is (14.00, 14.00)
MIN_CONTRAST = 0.05  # ink less than 5% brighter than the background is not a digit
INK_FRACTION = 0.1  # pixels above this fraction of the brightest one bound the digit

# 40 megapixels, a large phone photo. It bounds decoding memory: the decoded image, at most 4 bytes a pixel
# (160 MB at the limit, an RGBA PNG), plus ~30 MB of the decoder's buffers and strips (_reduced: no full-size
# copy is made; a JPEG is decoded at 1/2 to 1/8 scale); predict's process, torch's ~0.8 GB included, peaks
# under 1 GB (benchmarks/predict_memory.py; tests/test_predict.py checks the growth).
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 << 20  # 64 MiB: more than any 40-megapixel JPEG or PNG of a digit needs
WORK_SIDE = 2048  # larger images are box-reduced to this before the float maths: a digit needs far less
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # Pillow opens phones' MPO files as JPEG
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # per IHDR colour type: grey, RGB, palette, grey+alpha, RGBA
# Adam7 interlacing: each pass's first column and row and its steps across and down.
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class ImageError(Exception):
    """An image that cannot be read, decoded, or holds no digit; the message names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{display_name(path)}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable, so a decoding worker process can send it back
        return type(self), (self.path, self.reason)


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES + 1 of them; only a regular file.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    forever; the type is checked on the open descriptor, so a file swapped
    after a check cannot slip through. /dev/zero and folders are refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageError(path, "cannot read: not a regular file (a folder, device or pipe); pass an image file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(path, f"{info.st_size:,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes for an image; "
                             "pass a smaller image of the digit")
        try:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows while we read
        except OSError as exc:
            raise ImageError(path, f"cannot read ({exc.strerror or exc})") from None
    return data  # a file that grew past the limit, or an empty one: decode_gray refuses it, as it does bytes


def _open_checked(data: bytes, path: Path) -> Image.Image:
    """The decoded image (as stored: see _exif_turn); its pixel count checked from the header before decoding."""
    image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(path, f"{width}x{height} pixels, over the limit of {MAX_PIXELS // 10**6} megapixels; "
                         "pass a smaller image of the digit")
    if width * height == 0:
        raise ImageError(path, "image has no pixels")
    if image.format == "PNG" and not _png_rows_complete(data):
        raise ImageError(path, "the image data ends before the last row its header promises "
                         "(a truncated or damaged PNG)")
    shrink = max(width, height) / WORK_SIDE
    if image.format == "JPEG" and shrink > 1:
        # libjpeg decodes straight to 1/2, 1/4 or 1/8 scale (and to grey from colour): a 40-megapixel photo
        # never exists in memory at full size. draft keeps at least the size asked for.
        size = (math.ceil(width / shrink), math.ceil(height / shrink))
        image.draft("L" if image.mode in ("L", "RGB") else image.mode, size)
    image.load()  # the first frame only, for an animated GIF
    return image


# EXIF orientation -> the transpose that turns the stored image upright (as ImageOps.exif_transpose does).
EXIF_ORIENTATION = 0x0112
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _exif_turn(image: Image.Image):
    """The transpose that turns a photo taken sideways or upside down upright, or None.

    Applied to the reduced grey image, not to the decoded one: turning a 40-megapixel photo would copy it.
    """
    orientation = image.getexif().get(EXIF_ORIENTATION)
    return UPRIGHT.get(orientation) if isinstance(orientation, int) else None  # a crafted tag may be anything


def _png_rows_complete(data: bytes) -> bool:
    """Whether a PNG's image data holds every row its header promises.

    Pillow fills the missing rows of a deflate stream that ends early with
    black and says nothing (libpng: "Not enough image data"), and a digit read
    from such an image is a guess. So the bytes are counted: per row of each
    interlace pass a filter byte plus the packed pixels, against what the IDAT
    chunks inflate to, streamed in 1 MiB pieces and never held whole. Pillow
    has already checked the signature and that IHDR comes first.
    """
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * PNG_CHANNELS.get(colour, 0)
    expected = 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)  # ceiling division; <= 0: an empty pass
        if cols > 0 and rows > 0:
            expected += rows * (1 + (cols * bits + 7) // 8)
    inflate, inflated, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and inflated < expected:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            piece = data[pos + 8 : pos + 8 + length]
            while piece and inflated < expected and not inflate.eof:
                inflated += len(inflate.decompress(piece, 1 << 20))
                piece = inflate.unconsumed_tail
        pos += 12 + length
    return inflated >= expected


def _decode_gray(path: Path, notes: list) -> torch.Tensor:
    """(H, W) float in [0, 1] from an image file: upright, transparency composited, large ones reduced."""
    return decode_gray(_read_regular_file(path), path, notes)


def decode_gray(data: bytes, path="<image>", notes: list = None) -> torch.Tensor:
    """(H, W) float in [0, 1] from an image file's bytes (path names it in errors); see _decode_gray.

    What the decoder warns about the file (a damaged EXIF block, say: the image is read as stored) is
    appended to notes as our own words, never printed by the warnings machinery with Pillow's paths.
    """
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(path, f"{len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes for an image; "
                         "pass a smaller image of the digit")
    if not data:
        raise ImageError(path, "empty file")
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's bomb guard, behind MAX_PIXELS
            image = _open_checked(data, path)
            turn = _exif_turn(image)
            gray, scale = _flatten(_reduced(image))
            if turn is not None:
                gray = gray.transpose(turn)
        if notes is not None:
            notes += _decoder_notes(warned)
    except ImageError:
        raise
    except UnidentifiedImageError:
        kinds = f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
        raise ImageError(path, f"not a readable image (not a {kinds} file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"over the limit of {MAX_PIXELS // 10**6} megapixels; pass a smaller image") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for a bad file: one line
        raise ImageError(path, f"not a readable image ({first_line(exc)})") from None
    return _to_tensor(gray) / scale


def image_to_gray(image: Image.Image, path="<image>") -> torch.Tensor:
    """(H, W) float in [0, 1] from a decoded, upright Pillow image: transparency composited, large ones reduced."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(path, f"{width}x{height} pixels, over the limit of {MAX_PIXELS // 10**6} megapixels; "
                         "pass a smaller image of the digit")
    gray, scale = _flatten(_reduced(image))
    return _to_tensor(gray) / scale


def _reduced(image: Image.Image) -> Image.Image:
    """image box-reduced by a whole factor to at most WORK_SIDE pixels a side (a digit needs far less).

    The box filter is the antialiasing a shrink needs. It runs on strips of rows that are a multiple of
    the factor high (the same blocks as on the whole image), so no full-size copy is ever made: the
    decoded image is the only large allocation. Pillow reduces "RGBA" and "LA" premultiplied by alpha,
    so compositing afterwards matches compositing first; what reduce cannot take (palette, bilevel,
    16-bit, CMYK, a colour-key transparency that averaging would break) is converted strip by strip.
    """
    factor = math.ceil(max(image.size) / WORK_SIDE)
    if factor <= 1:
        return image
    width, height = image.size
    rows = factor * 32  # 2 MB strips of a 40-megapixel RGBA image
    pieces = [_reducible(image.crop((0, y, width, min(y + rows, height)))).reduce(factor)
              for y in range(0, height, rows)]
    reduced = Image.new(pieces[0].mode, (pieces[0].width, sum(p.height for p in pieces)))
    top = 0
    for piece in pieces:
        reduced.paste(piece, (0, top))
        top += piece.height
    return reduced


def _reducible(image: Image.Image) -> Image.Image:
    """image in a mode Image.reduce takes, keeping what _flatten needs (alpha, 16-bit range)."""
    if "transparency" in image.info or image.mode in ("PA", "La", "RGBa"):
        return image.convert("RGBA")
    if image.mode.startswith("I") and image.mode != "I":
        return image.convert("I")  # 16-bit grey: "I" keeps every level (and _flatten its scale)
    if image.mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def _decoder_notes(warned) -> list:
    """One line per distinct warning the decoder gave, in our words (the first line of its message, cut)."""
    lines = dict.fromkeys(first_line(w.message).split(": ", 1)[-1] for w in warned)
    return [f"the decoder warned ({line}); the image was read anyway" for line in lines]


def _flatten(image: Image.Image):
    """(single-channel "L" or "F" image, full-scale value): transparency composited onto its background."""
    if image.mode.startswith("I"):  # 16-bit grey PNG: "L" would clip it, "F" keeps every level
        return image.convert("F"), 65535.0
    if image.mode == "F":
        return image, 1.0
    if not (image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info):
        return image.convert("L"), 255.0
    rgba = image.convert("RGBA")
    gray, alpha = rgba.convert("L"), rgba.getchannel("A")
    background = Image.new("L", image.size, _implied_background(gray, alpha))
    background.paste(gray, mask=alpha)  # gray * alpha + background * (1 - alpha)
    return background, 255.0


def _implied_background(gray: Image.Image, alpha: Image.Image) -> int:
    """White under dark ink, black under light ink: a transparent background is meant to contrast.

    The ink is what is opaque; its mean brightness, weighted by opacity,
    decides. Black ink on a transparent background (a drawing app's export)
    then reads as dark-on-light paper instead of as all black.
    """
    opacity = ImageStat.Stat(alpha).sum[0]
    if opacity == 0:
        return 0  # nothing drawn: blank either way
    ink = ImageStat.Stat(ImageChops.multiply(gray, alpha)).sum[0] * 255  # sum of gray * alpha, in 8 bits
    return 255 if ink / opacity < 127.5 else 0


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An "L" or "F" Pillow image as an (H, W) float32 tensor of its raw values."""
    dtype = torch.float32 if image.mode == "F" else torch.uint8
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=dtype).reshape(height, width).float()


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


def load_digit(path, notes: list = None) -> torch.Tensor:
    """An image file as a (1, 28, 28) float32 tensor in [0, 1], the way MNIST's digits look.

    notes, when given, receives one line per thing the decoder warned about (the file was still read).
    """
    path = Path(path)
    return digit_from_gray(_decode_gray(path, [] if notes is None else notes), path)


def digit_from_gray(gray: torch.Tensor, path="<image>") -> torch.Tensor:
    """A (H, W) grey image in [0, 1], either polarity, as a (1, 28, 28) MNIST-convention digit; see load_digit."""
    ink = _ink(gray, path)
    return _centre_by_mass(_fit_box(ink)).clamp_(0.0, 1.0)[None].contiguous()


@torch.no_grad()
def predict_files(checkpoint_path, image_paths, device="auto") -> list:
    """Per file, {"file", "digit", "probability"} or {"file", "error"}, in the given order.

    "file" is the name as given (a str; undecodable bytes as os.fsdecode carries them): callers that
    print it use fastmnist.display (display_name for people, json_name for JSON). "warning", where
    present, is what the decoder warned about a file it still read, in one line.
    A bad checkpoint (or one whose weights are not finite) raises CheckpointError;
    a bad image only fails its own entry, whatever the decoder raised.
    """
    from fastmnist.api import load  # the one inference path under the CLI, the API and the web page

    classifier = load(checkpoint_path, device)
    results, digits = [], []
    for name in image_paths:
        name, notes = os.fsdecode(name), []
        try:
            digits.append(load_digit(name, notes))
            results.append({"file": name})
        except ImageError as exc:
            results.append({"file": name, "error": exc.reason})  # the caller prints the file
        except Exception as exc:  # a decoder's bug or MemoryError costs this file its answer, not the others
            results.append({"file": name, "error": f"could not be processed ({first_line(exc)})"})
        if notes:
            results[-1]["warning"] = "; ".join(notes)
    if digits:
        probs = classifier.probabilities(torch.stack(digits), check_finite=False)
        p, digit = probs.max(1)
        finite = torch.isfinite(probs).all(1)
        ok = (r for r in results if "error" not in r)
        for r, d, q, good in zip(ok, digit.tolist(), p.tolist(), finite.tolist()):
            if good:
                r.update(digit=d, probability=q)
            else:  # never a NaN "answer" (nor invalid JSON): say that the model failed on it
                r["error"] = "the model's output is not finite (NaN or infinite) for this image"
    return results
