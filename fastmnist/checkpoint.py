"""model.pt: saving a trained model and loading one a user hands us.

(A run's resumable state, checkpoint.pt, is fastmnist.training_state; its folder, fastmnist.runs.)
"""
from pathlib import Path

import torch

from fastmnist.files import torch_save_atomic

# v2: each block's Dropout2d lives inside its ConvReLUBN, so the Sequential's
# indices (and state_dict keys) differ from v1's. v3: the transition (conv,
# ReLU, pool) and the head (conv, pool) are one ConvPool each: indices moved again.
# v4: the default network pools after two blocks (18,410 parameters), and model.pt
# holds the moving average of the weights.
MODEL_FORMAT = "fastmnist-model-v4"


class CheckpointError(Exception):
    """A missing, corrupt or foreign checkpoint, with the remedy in its message."""


def load_file(path: Path, what: str, remedy: str):
    """A torch file a user may hand us (model.pt, checkpoint.pt), tensors only, or one CheckpointError.

    Bounded and weights_only, as a model.pt is: fastmnist.model_file (which imports this module's errors).
    """
    from fastmnist.model_file import MAX_TRAINING_STATE_BYTES, read_torch_file

    return read_torch_file(path, what, remedy, MAX_TRAINING_STATE_BYTES)


def save_model(path: Path, model: torch.nn.Module, model_kwargs: dict) -> None:
    torch_save_atomic({"format": MODEL_FORMAT, "state_dict": model.state_dict(), "model_kwargs": model_kwargs}, path)


def load_model(path, device="cpu"):
    """(model in eval mode, model_kwargs) from a model.pt: fastmnist.model_file.load_model, bounded and checked."""
    from fastmnist.model_file import load_model as load_checked  # model_file imports this module's errors

    return load_checked(path, device)
