"""model.pt: saving a trained model and loading one a user hands us.

(A run's resumable state, checkpoint.pt, is fastmnist.training_state; its folder, fastmnist.runs.)
"""
from pathlib import Path

import torch

from fastmnist.errors import first_line
from fastmnist.files import torch_save_atomic
from fastmnist.model import MEMORY_FORMAT, build_model

# v2: each block's Dropout2d lives inside its ConvReLUBN, so the Sequential's
# indices (and state_dict keys) differ from v1's. v3: the transition (conv,
# ReLU, pool) and the head (conv, pool) are one ConvPool each: indices moved again.
# v4: the default network pools after two blocks (18,410 parameters), and model.pt
# holds the moving average of the weights.
MODEL_FORMAT = "fastmnist-model-v4"


class CheckpointError(Exception):
    """A missing, corrupt or foreign checkpoint, with the remedy in its message."""


def load_file(path: Path, what: str, remedy: str):
    """A torch file a user may hand us (model.pt, checkpoint.pt), tensors only, or one CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what}; {remedy}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file (0 bytes), not a {what}; {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: report one line
        raise CheckpointError(f"{path}: not a readable {what} ({first_line(exc)}); {remedy}") from None


def save_model(path: Path, model: torch.nn.Module, model_kwargs: dict) -> None:
    torch_save_atomic({"format": MODEL_FORMAT, "state_dict": model.state_dict(), "model_kwargs": model_kwargs}, path)


def load_model(path, device="cpu"):
    """(model in eval mode, model_kwargs) from a model.pt written by fastmnist train."""
    path = Path(path)
    ckpt = load_file(path, "model checkpoint", "pass the model.pt that `fastmnist train` wrote")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_kwargs" not in ckpt:
        raise CheckpointError(f"{path}: not a fastmnist model checkpoint (expected a dict with state_dict and model_kwargs)")
    if ckpt.get("format") != MODEL_FORMAT:
        raise CheckpointError(
            f"{path}: saved in format {ckpt.get('format')!r}, but this fastmnist reads {MODEL_FORMAT!r}; "
            "retrain with this version (`fastmnist train`)"
        )
    if not isinstance(ckpt["model_kwargs"], dict) or not all(isinstance(k, str) for k in ckpt["model_kwargs"]):
        raise CheckpointError(f"{path}: model_kwargs is a {type(ckpt['model_kwargs']).__name__}, not a dict of "
                              "build_model arguments; pass the model.pt that `fastmnist train` wrote")
    # The weights are the same for both impls, so the saved one does not matter here: "auto" lets
    # build_model (layers.resolve_impl) pick our kernels where this install has them for the device.
    kwargs = {**ckpt["model_kwargs"], "impl": "auto"}
    try:
        model = build_model(**kwargs, device=device)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: does not fit the model it names ({first_line(exc)}); "
            "was it saved by another version or for another model?"
        ) from None
    check_finite(model, path)
    return model.to(device, memory_format=MEMORY_FORMAT).eval(), ckpt["model_kwargs"]


def check_finite(model: torch.nn.Module, path) -> None:
    """Refuse a model with NaN or infinite weights: every answer it gave would be meaningless."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{path}: the model is broken: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
            "infinite values, so its answers would be meaningless; "
            "retrain it (`fastmnist train`) or pass another model.pt"
        )
