"""Reading a model.pt that may be a stranger's: bounded memory, every value checked before it is used.

torch.load inflates each record of the zip archive that torch.save writes into memory at the size the
archive declares (a 2 MB file can declare 2 GB), and the pickle inside may rebuild any tensor, among
them a 0.1 MB one that views a 2 GB shape through zero strides. So, in this order:
1. read_torch_file: only a regular file of at most max_bytes, read once into memory (nothing swaps it
   between the checks and the load), a zip archive whose records' declared sizes (from its central
   directory: nothing is inflated to learn them) sum to at most max_bytes. torch's zip reader (miniz)
   inflates a record into a buffer of its declared size and fails one that inflates further, so a size
   that lies cannot grow memory either. Then torch.load(weights_only=True): tensors and plain
   containers only, never code.
2. check_model_kwargs: each build argument's type, then its range, before any value is used; a tensor
   where a number belongs is refused unseen.
3. check_state_dict: every tensor the model needs is there, dense, real, of its kind of dtype and its
   shape; the error names the tensor and both shapes.
4. check_finite: no NaN or infinite weight.
Each refusal is one CheckpointError line naming the file (display.display_name) with every value quoted
from it cut short (display.shorten). Warnings torch raises on the file become that error, not output.

The bounds are fitted to our largest model: the default network's model.pt is 86 KB on disk, 79 KB
inflated, in 47 records; a training checkpoint.pt of it, 265 KB in 115 records.

Every face that opens a model.pt a user names (the CLI's eval and predict, a Python API, a web server)
calls load_model; read_torch_file serves any other file torch.save wrote that may come from a stranger.
"""
import io
import os
import stat
import warnings
import zipfile
from pathlib import Path

import torch

from fastmnist.checkpoint import MODEL_FORMAT, CheckpointError
from fastmnist.display import display_name, shorten, shorten_sequence
from fastmnist.layers import IMPLS
from fastmnist.errors import first_line
from fastmnist.model import LAYOUTS, MEMORY_FORMAT, build_model

MAX_MODEL_BYTES = 4 << 20  # 4 MiB on disk and inflated: 50x the default network's model.pt
MAX_TRAINING_STATE_BYTES = 16 << 20  # checkpoint.pt adds the optimiser, the moving average, RNG states, history
MAX_RECORDS = 1000  # zip records: a model.pt has 47 (one per tensor and a few of torch's own)
MODEL_REMEDY = "pass the model.pt that `fastmnist train` wrote"
DROPOUT_RANGE = (0.0, 1.0)  # [0, 1): a Dropout2d probability, as --dropout allows


def read_torch_file(path, what: str = "model checkpoint", remedy: str = MODEL_REMEDY,
                    max_bytes: int = MAX_MODEL_BYTES):
    """What torch.save wrote to path, loaded with weights_only and bounded memory (see the module's 1.).

    Raises CheckpointError, one line naming the file, the bound it broke and the remedy.
    """
    data = _read_regular_file(Path(path), what, remedy, max_bytes)
    name = display_name(path)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{name}: not a readable {what} (not the zip archive torch.save writes: "
                              f"{shorten(str(exc))}); {remedy}") from None
    declared = sum(r.file_size for r in records)
    if len(records) > MAX_RECORDS or declared > max_bytes:
        raise CheckpointError(
            f"{name}: not a {what} of ours: its {len(records):,} records would inflate to {declared:,} bytes, over "
            f"the limit of {MAX_RECORDS:,} records and {max_bytes:,} bytes (fastmnist writes them under 1 MB); "
            f"{remedy}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning about the file's contents is a reason to refuse it
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: report one line
        raise CheckpointError(f"{name}: not a readable {what} ({first_line(exc)}); {remedy}") from None


def _read_regular_file(path: Path, what: str, remedy: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (O_NONBLOCK: a FIFO cannot make us wait)."""
    name = display_name(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no such {what}; {remedy}") from None
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read the {what} ({exc.strerror or exc}); {remedy}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{name}: no such {what} (not a regular file: a folder, device or pipe); {remedy}")
        if info.st_size == 0:
            raise CheckpointError(f"{name}: an empty file (0 bytes), not a {what}; {remedy}")
        if info.st_size > max_bytes:
            raise CheckpointError(f"{name}: {info.st_size:,} bytes, over the limit of {max_bytes:,} bytes for a {what} "
                                  f"(fastmnist writes them under 1 MB); {remedy}")
        try:
            data = f.read(max_bytes + 1)  # bounded even if the file grows while we read
        except OSError as exc:
            raise CheckpointError(f"{name}: cannot read the {what} ({exc.strerror or exc}); {remedy}") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{name}: over the limit of {max_bytes:,} bytes for a {what}; {remedy}")
    return data


def check_model_kwargs(kwargs, name: str) -> dict:
    """build_model's arguments from a model.pt, each checked by type and then range before any is used.

    name is the file's display name, for the messages. Returns the arguments to build with.
    """
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"{name}: model_kwargs is a {type(kwargs).__name__}, not a dict of build_model "
                              f"arguments; {MODEL_REMEDY}")
    unknown = [k for k in kwargs if k not in ("name", "impl", "dropout")]
    if unknown:
        shown = shorten_sequence([shorten(k) for k in unknown])
        raise CheckpointError(f"{name}: model_kwargs holds unknown arguments {shown} "
                              f"(expected name, impl, dropout); {MODEL_REMEDY}")
    model = kwargs.get("name", "default")
    if type(model) is not str or model not in LAYOUTS:
        raise CheckpointError(f"{name}: model_kwargs names the model {shorten(model)}, not one of {sorted(LAYOUTS)}; "
                              f"{MODEL_REMEDY}")
    impl = kwargs.get("impl", "auto")
    if impl is not None and (type(impl) is not str or impl not in IMPLS + ("auto",)):
        raise CheckpointError(f"{name}: model_kwargs has impl {shorten(impl)}, not one of {IMPLS + ('auto',)}; "
                              f"{MODEL_REMEDY}")
    dropout = kwargs.get("dropout", 0.0)
    # type() is, not isinstance: a bool, a numpy scalar or a tensor (which a comparison would compute on,
    # however large it claims to be) is refused before any comparison.
    if type(dropout) not in (int, float) or not DROPOUT_RANGE[0] <= dropout < DROPOUT_RANGE[1]:
        raise CheckpointError(f"{name}: model_kwargs has dropout {shorten(dropout)}, not a number in [0, 1); "
                              f"{MODEL_REMEDY}")
    # The weights are the same for both impls, so the saved one does not matter here: "auto" lets
    # build_model (layers.resolve_impl) pick our kernels where this install has them for the device.
    return {"name": model, "dropout": float(dropout), "impl": "auto"}


def check_state_dict(state_dict, expected: dict, name: str) -> None:
    """Refuse a state_dict that does not fit the model whose state_dict() is expected, naming the tensor."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError(f"{name}: state_dict is a {type(state_dict).__name__}, not a dict of named tensors; "
                              f"{MODEL_REMEDY}")
    fits, remedy = f"{name}: does not fit the model it names", "was it saved by another version or for another model?"
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise CheckpointError(f"{fits}: state_dict lacks {_some(missing)} ({len(missing)} of the {len(expected)} "
                              f"tensors of the model); {remedy}")
    if unexpected:
        raise CheckpointError(f"{fits}: state_dict has {_some(unexpected)}, which the model does not "
                              f"({len(unexpected)} extra); {remedy}")
    for key, want in expected.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{fits}: state_dict[{key!r}] is {shorten(got)}, not a tensor; {remedy}")
        if got.layout != torch.strided or got.is_quantized or got.is_nested or got.device.type != "cpu":
            raise CheckpointError(f"{fits}: state_dict[{key!r}] is a {got.layout} tensor on {got.device.type}, "
                                  f"not a dense one; {remedy}")
        if got.dtype.is_complex or got.dtype == torch.bool or got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{fits}: state_dict[{key!r}] holds {got.dtype}, the model {want.dtype}; {remedy}")
        if got.shape != want.shape:
            raise CheckpointError(f"{fits}: state_dict[{key!r}] has shape {shorten_sequence(tuple(got.shape))}, the "
                                  f"model {shorten_sequence(tuple(want.shape))}; {remedy}")


def _some(keys, shown: int = 3) -> str:
    return ", ".join(shorten(k) for k in keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_finite(model: torch.nn.Module, path) -> None:
    """Refuse a model with NaN or infinite weights: every answer it gave would be meaningless."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{display_name(path)}: the model is broken: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN "
            "or infinite values, so its answers would be meaningless; "
            "retrain it (`fastmnist train`) or pass another model.pt"
        )


def load_model(path, device="cpu"):
    """(model in eval mode, model_kwargs as saved) from a model.pt that may be hostile (see the module).

    Every refusal is a CheckpointError of one line. The model is built with impl "auto": our kernels
    wherever this install has them for the device.
    """
    name = display_name(path)
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_kwargs" not in ckpt:
        raise CheckpointError(f"{name}: not a fastmnist model checkpoint (expected a dict with state_dict and "
                              "model_kwargs)")
    fmt = ckpt.get("format")
    if type(fmt) is not str or fmt != MODEL_FORMAT:
        raise CheckpointError(f"{name}: saved in format {shorten(fmt)}, but this fastmnist reads {MODEL_FORMAT!r}; "
                              "retrain with this version (`fastmnist train`)")
    kwargs = check_model_kwargs(ckpt["model_kwargs"], name)
    model = build_model(**kwargs, device=device)
    check_state_dict(ckpt["state_dict"], model.state_dict(), name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # checked above; a tensor torch still cannot copy is one line, not a traceback
        raise CheckpointError(f"{name}: does not fit the model it names ({first_line(exc)}); "
                              "was it saved by another version or for another model?") from None
    check_finite(model, path)
    return model.to(device, memory_format=MEMORY_FORMAT).eval(), ckpt["model_kwargs"]

