"""The Python API: load a trained model and classify digits; train and evaluate without a subprocess.

    clf = fastmnist.load("runs/my-run")          # a run folder or its model.pt
    clf.predict(["seven.png", image_tensor])     # -> Predictions(digits, probabilities)

One inference path under every face: `fastmnist predict`, `fastmnist serve` and this module
bring images to MNIST's convention with fastmnist.predict's functions and run the model through
Classifier.probabilities.
"""
from __future__ import annotations  # help() shows the annotations as written: ImageLike, not its expansion

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastmnist import ops
from fastmnist.checkpoint import CheckpointError, load_model
from fastmnist.device import resolve_device
from fastmnist.errors import first_line
from fastmnist.model import MEMORY_FORMAT, count_parameters

SIDE = 28  # MNIST's images are 28 x 28
BATCH_SIZE = 1000  # images per forward pass: 10,000 images run as 10 batches
MAX_METRICS_BYTES = 1 << 20  # metrics.json beside a model.pt is read for the card only; a larger one is ignored


class InputError(ValueError):
    """Images the model cannot take (wrong shape, dtype, NaN or out-of-range pixels, none at all) or a bad argument."""


class Predictions(NamedTuple):
    """What Classifier.predict returns: one row per image, in the order given."""

    digits: torch.Tensor  # (N,) int64: the most probable digit
    probabilities: torch.Tensor  # (N, 10) float32: softmax over the digits 0-9; each row sums to 1


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model's card: what it is, how good it was, and which kernels run it."""

    path: str  # the model.pt
    model: str  # the network's name: default, reference or tiny
    parameters: int
    test_accuracy: Optional[float]  # final_test_acc of the run's metrics.json beside model.pt; None without one
    impl: str  # "fused" (our operator) or "stock" (torch.nn layers)
    bn_folded: bool  # each BatchNorm folded into the convolution after it (see inference_model)
    kernel_path: str  # the kernels that run it: "avx512 tiles, ...", "fused CUDA kernels", "stock PyTorch layers"
    device: str
    fastmnist_version: str

    def to_dict(self) -> dict:
        return asdict(self)


ImageLike = Union[str, os.PathLike, bytes, torch.Tensor, "numpy.ndarray", "PIL.Image.Image"]  # see predict


class Classifier:
    """A trained fastmnist model in eval mode on one device; build it with fastmnist.load(path)."""

    def __init__(self, model: nn.Module, info: ModelInfo, device: torch.device):
        self.model, self.info, self.device = model.eval(), info, device

    def __repr__(self) -> str:
        i = self.info
        acc = "" if i.test_accuracy is None else f", test accuracy {100 * i.test_accuracy:.2f}%"
        return f"Classifier({i.path!r}: {i.model}, {i.parameters:,} parameters{acc}, {i.impl} on {i.device})"

    def preprocess(self, image: ImageLike, mnist_style: Optional[bool] = None) -> torch.Tensor:
        """The (28, 28) float tensor in [0, 1] the model sees for one image (see predict for what an image is)."""
        batch = images_to_batch(image, mnist_style)
        if len(batch) != 1:
            raise InputError(f"preprocess takes one image, got a batch of {len(batch)}; use predict for batches")
        return batch[0, 0]

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], mnist_style: Optional[bool] = None,
                batch_size: int = BATCH_SIZE) -> Predictions:
        """Digits and the 10 probabilities per image, for one image or many.

        An image is a file path, the bytes of an image file, a PIL image, or a numpy array or
        tensor: (28, 28), a batch (N, 28, 28) or (N, 1, 28, 28), uint8 in 0-255 or float in 0-1,
        or one grey image (H, W) of any size. Files, bytes, PIL images and (H, W) arrays of other
        sizes are photos or drawings: each is brought to MNIST's convention (white digit on black,
        20x20 box, centred by mass) as `fastmnist predict` does. 28x28 arrays are taken as MNIST
        digits already (mnist_style=False brings them to the convention too). A list may mix kinds.
        """
        return self.predict_batch(images_to_batch(images, mnist_style), batch_size)

    def predict_batch(self, batch: torch.Tensor, batch_size: int = BATCH_SIZE) -> Predictions:
        """Predictions for an (N, 1, 28, 28) float tensor in [0, 1], as images_to_batch makes."""
        probs = self.probabilities(batch, batch_size)
        return Predictions(probs.argmax(1), probs)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, batch_size: int = BATCH_SIZE, check_finite: bool = True) -> torch.Tensor:
        """(N, 10) softmax probabilities on the CPU for an (N, 1, 28, 28) float batch, batch_size at a time.

        A NaN or infinite output raises CheckpointError, unless check_finite=False (`fastmnist predict`
        reports it per image).
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (1, SIDE, SIDE) or len(batch) == 0:
            raise InputError(f"a batch must be (N, 1, 28, 28) with N >= 1, got {tuple(batch.shape)}; "
                             "predict takes images of every other kind")
        out = []
        for i in range(0, len(batch), batch_size):
            x = batch[i : i + batch_size].to(self.device, torch.float32).contiguous(memory_format=MEMORY_FORMAT)
            out.append(F.softmax(self.model(x).float(), dim=1).cpu())
        probs = torch.cat(out)
        bad = (~torch.isfinite(probs).all(1)).nonzero().flatten()
        if check_finite and len(bad):  # finite weights can still overflow; never hand back a NaN "answer"
            raise CheckpointError(f"{self.info.path}: the model's output is not finite (NaN or infinite) for "
                                  f"image {bad[0].item()} ({len(bad)} images in all); retrain it or pass another model.pt")
        return probs

    def export(self, path, format: str = "onnx", data_dir=None, log=print) -> Path:
        """Write the model as ONNX (standard ops, opset 18, dynamic batch) or torch.export .pt2 ("pt2"),
        after checking the written model against this one on the MNIST test set (fastmnist.export)."""
        from fastmnist.export import export

        return export(self.info.path, path, format, data_dir=data_dir, log=log)

    def export_onnx(self, path, data_dir=None, log=print) -> Path:
        """Write the model as ONNX; see export."""
        return self.export(path, "onnx", data_dir=data_dir, log=log)


def load(path: Union[str, os.PathLike], device: str = "auto") -> Classifier:
    """A Classifier for a model.pt written by `fastmnist train`, or for a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise CheckpointError(f"{path}: no model.pt in this folder; pass a run folder that `fastmnist train` "
                                  "finished, or a model.pt")
        path = path / "model.pt"
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    model, kwargs = load_model(path, dev)
    impl = next((m.impl for m in model.modules() if hasattr(m, "impl")), "stock")
    runner, folded = inference_model(model, impl)
    from fastmnist import __version__

    info = ModelInfo(path=str(path), model=kwargs.get("name", "default"), parameters=count_parameters(model),
                     test_accuracy=_recorded_accuracy(path.parent / "metrics.json"), impl=impl, bn_folded=folded,
                     kernel_path=kernel_path(impl, dev), device=str(dev), fastmnist_version=__version__)
    return Classifier(runner, info, dev)


def inference_model(model: nn.Module, impl: str) -> tuple:
    """(the model to run, whether its BNs are folded): folded on the stock path only.

    Folding each BN into the next (unpadded) convolution is exact, and it is faster on the stock
    path, which then runs two ops per block instead of three. Our fused kernels already apply the BN
    in the convolution's epilogue, and trading them for stock Conv2d + ReLU was slower, so the fused
    model runs as it is. (A quick check, 1,000 images on one thread of a busy shared 2-core CPU,
    rough: stock 430 -> 300 ms folded; fused 164 ms, folded stock 179 ms.)
    """
    if impl == "fused":
        return model, False
    try:
        return model.fold().to(memory_format=MEMORY_FORMAT), True
    except (AttributeError, ValueError):  # not a FastMNISTNet, or a BN that cannot be folded exactly
        return model, False


def kernel_path(impl: str, device: torch.device) -> str:
    """The kernels that run a model: the CPU tiles' ISA, CUDA kernels, or the stock layers."""
    if impl != "fused":
        return "stock PyTorch layers"
    return ops.cpu_kernel_path() if device.type == "cpu" else f"fused {device.type.upper()} kernels"


def _recorded_accuracy(metrics_path: Path) -> Optional[float]:
    """The run's final test accuracy from its metrics.json, or None where there is no readable one."""
    try:
        if not metrics_path.is_file() or metrics_path.stat().st_size > MAX_METRICS_BYTES:
            return None
        acc = json.loads(metrics_path.read_text()).get("final_test_acc")
    except (OSError, ValueError, AttributeError):
        return None
    return float(acc) if isinstance(acc, (int, float)) and 0.0 <= acc <= 1.0 else None


# ---- training and evaluation -----------------------------------------------------------------------------

def train(out: Union[str, os.PathLike, None] = None, *, model: Optional[str] = None, epochs: Optional[int] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, weight_decay: Optional[float] = None,
          dropout: Optional[float] = None, label_smoothing: Optional[float] = None,
          ema_decay: Optional[float] = None, augment: Optional[bool] = None, seed: Optional[int] = None,
          impl: Optional[str] = None, device: Optional[str] = None, data_dir: Union[str, os.PathLike, None] = None,
          limit_train: Optional[int] = None, limit_test: Optional[int] = None, resume: bool = False,
          overwrite: bool = False, progress: bool = False, log=print) -> dict:
    """Train as `fastmnist train` does, with the same settings as its flags; returns the run's metrics dict.

    Settings left None come from the model's recipe (`fastmnist train --help` names them); out is
    the run folder (None: a new one under runs/), which then holds model.pt and metrics.json.
    """
    from fastmnist.train import TrainConfig, train as run_training

    given = {name: value for name, value in dict(
        model=model, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, dropout=dropout,
        label_smoothing=label_smoothing, ema_decay=ema_decay, augment=augment, seed=seed, impl=impl,
        device=device, limit_train=limit_train, limit_test=limit_test).items() if value is not None}
    check_train_settings(given)
    if resume and given:
        raise InputError(f"resume=True continues the run in {out} with its saved settings; drop "
                         f"{', '.join(sorted(given))}, or start a new run in another folder")
    cfg = TrainConfig(**given, data_dir=None if data_dir is None else str(data_dir),
                      out=None if out is None else str(out), progress=progress)
    return run_training(cfg, resume=resume, overwrite=overwrite, log=log)


def check_train_settings(settings: dict) -> None:
    """Refuse a setting the command line would refuse, with the same reason: the CLI's parser is the one check."""
    import contextlib
    import io

    from fastmnist.cli import build_parser

    argv = ["train"]
    for name, value in settings.items():
        if name == "augment":
            argv += [] if value else ["--no-augment"]
        else:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            message = re.sub(r"argument --([\w-]+)", lambda m: m[1].replace("-", "_"), message)
            raise InputError(message.replace("invalid choice", "not one of the choices")) from None


def evaluate(path: Union[str, os.PathLike], data_dir: Union[str, os.PathLike, None] = None,
             device: str = "auto") -> dict:
    """Test accuracy of a model.pt (or a run folder), overall and per digit, as `fastmnist eval` prints it.

    Returns test_acc and test_loss with report.json's numbers: per_class, confusion, mistakes.
    """
    from fastmnist.report import summarize
    from fastmnist.evaluation import evaluate_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    try:
        resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc).replace("--device ", "device=")) from None
    result = evaluate_checkpoint(path, None if data_dir is None else str(data_dir), device, log=lambda *a: None,
                                 predictions=True)
    summary = summarize(result["labels"], result["probabilities"])
    return {"checkpoint": str(path), "test_acc": result["test_acc"], "test_loss": result["test_loss"],
            "model_kwargs": result["model_kwargs"], **summary}


# ---- images to a batch ---------------------------------------------------------------------------------

def images_to_batch(images, mnist_style: Optional[bool] = None) -> torch.Tensor:
    """(N, 1, 28, 28) float32 in [0, 1] on the CPU from whatever Classifier.predict accepts."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("an empty list of images: pass at least one image")
        return torch.cat([_item_to_batch(x, mnist_style, f"images[{i}]") for i, x in enumerate(images)])
    return _item_to_batch(images, mnist_style, "images")


def _item_to_batch(item, mnist_style: Optional[bool], name: str) -> torch.Tensor:
    from fastmnist import predict  # Pillow and torchvision: imported only when images are read

    if isinstance(item, (str, os.PathLike)):
        return predict.load_digit(item)[None]
    if isinstance(item, (bytes, bytearray)):
        return predict.digit_from_gray(predict.decode_gray(bytes(item), name), name)[None]
    if _is_pil_image(item):
        return predict.digit_from_gray(_pil_to_gray(item, name), name)[None]
    if type(item).__module__ == "numpy" and type(item).__name__ == "ndarray":
        if item.dtype.kind not in "uif" or item.dtype.itemsize > 8:
            raise InputError(f"{name}: numpy dtype {item.dtype} is not an image type; pass uint8 (0-255) or float (0-1)")
        item = torch.from_numpy(item.copy())
    if not isinstance(item, torch.Tensor):
        raise InputError(f"{name}: a {type(item).__name__} is not an image; pass a file path, bytes, a PIL image, "
                         "a numpy array or a tensor")
    return _tensor_to_batch(item.detach().cpu(), mnist_style, name)


def _is_pil_image(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def _pil_to_gray(image, name: str) -> torch.Tensor:
    from PIL import ImageOps

    from fastmnist import predict

    try:
        return predict.image_to_gray(ImageOps.exif_transpose(image), name)
    except predict.ImageError:
        raise
    except Exception as exc:  # a PIL image that cannot be converted (a mode Pillow cannot turn grey)
        raise predict.ImageError(name, f"not a usable image ({first_line(exc)})") from None


def _tensor_to_batch(t: torch.Tensor, mnist_style: Optional[bool], name: str) -> torch.Tensor:
    """A tensor of pixels as (N, 1, 28, 28) float in [0, 1]; 28x28 images as they are unless mnist_style=False."""
    shape = tuple(t.shape)
    batched = t.dim() == 3 and shape[1:] == (SIDE, SIDE) or t.dim() == 4 and shape[1:] == (1, SIDE, SIDE)
    if not (batched or t.dim() == 2):
        raise InputError(f"{name}: shape {shape} is not an image or a batch of images; pass (28, 28), "
                         "(N, 28, 28) or (N, 1, 28, 28), or one grey image (H, W) of any size")
    if t.numel() == 0:
        raise InputError(f"{name}: shape {shape} holds no pixels; pass at least one image")
    pixels = _pixels_in_unit_range(t, name)
    if pixels.dim() == 2 and shape != (SIDE, SIDE):
        if mnist_style:
            raise InputError(f"{name}: shape {shape} is not 28x28, so it cannot be taken as an MNIST digit as it "
                             "is; leave mnist_style unset to bring it to MNIST's convention")
        mnist_style = False
    images = pixels.reshape(-1, SIDE, SIDE) if pixels.dim() > 2 or mnist_style is not False else pixels[None]
    if mnist_style is not False:
        return images[:, None].contiguous()
    from fastmnist.predict import digit_from_gray

    return torch.stack([digit_from_gray(g, name if len(images) == 1 else f"{name}[{i}]")
                        for i, g in enumerate(images)])


def _pixels_in_unit_range(t: torch.Tensor, name: str) -> torch.Tensor:
    """float32 pixels in [0, 1]: uint8 divided by 255; floats checked (finite, within [0, 1]); others refused."""
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        hint = " (numbers 0-255: convert with .astype('uint8') or .to(torch.uint8))" if t.dtype != torch.bool else ""
        raise InputError(f"{name}: dtype {t.dtype} is not an image type; pass uint8 (0-255) or float (0-1){hint}")
    t = t.float()
    finite = torch.isfinite(t)
    if not finite.all():
        where = (~finite).nonzero()[0].tolist()
        raise InputError(f"{name}: {(~finite).sum().item()} pixels are NaN or infinite (the first at index "
                         f"{tuple(where)}); pass finite values in [0, 1]")
    low, high = t.min().item(), t.max().item()
    if low < 0.0 or high > 1.0:
        hint = "; divide by 255 (or pass uint8)" if high > 1.0 else ""
        raise InputError(f"{name}: float pixels range over [{low:g}, {high:g}], but must be in [0, 1]{hint}")
    return t
