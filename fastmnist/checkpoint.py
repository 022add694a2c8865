"""Saving and loading runs: atomic writes, training state, saved models.

Every file is written to a temporary name in the same folder and renamed
into place, so a crash or a kill mid-write never leaves a broken file.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


STATE_FILE = "checkpoint.pt"  # resumable training state, rewritten after every epoch
RUN_FILES = (STATE_FILE, "metrics.json", "model.pt")
# --overwrite moves the old run's files here and deletes them only once the new
# run has written its first checkpoint; a run that fails before gets them back.
PREVIOUS_RUN = ".previous-run"
REPLACED_FILES = RUN_FILES + ("curves.png",)
# v2: each block's Dropout2d lives inside its ConvReLUBN, so the Sequential's
# indices (and state_dict keys) differ from v1's. v3: the transition (conv,
# ReLU, pool) and the head (conv, pool) are one ConvPool each: indices moved again.
# v4: the default network pools after two blocks (18,410 parameters), and model.pt
# holds the moving average of the weights.
MODEL_FORMAT = "fastmnist-model-v4"


class CheckpointError(Exception):
    """A missing, corrupt or foreign checkpoint, with the remedy in its message."""


class RunExistsError(Exception):
    """--out already holds a run and neither --resume nor --overwrite was given."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def torch_save_atomic(obj, path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(path, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create out; refuse one that holds a run unless overwrite; fail early if unwritable.

    With overwrite, the old run is moved aside, not deleted: save_training_state
    deletes it once the new run has a checkpoint, restore_previous_run puts it
    back if the new run fails before that.
    """
    out = Path(out)
    restore_previous_run(out)  # left aside by a replacing run that was killed before its first checkpoint
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        if existing:
            (out / PREVIOUS_RUN).mkdir(exist_ok=True)
            for name in REPLACED_FILES:
                if (out / name).exists():
                    os.replace(out / name, out / PREVIOUS_RUN / name)
    except OSError as exc:
        raise RunExistsError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def restore_previous_run(out: Path) -> None:
    """Put back the run that --overwrite moved aside, where no new file has replaced it."""
    aside = Path(out) / PREVIOUS_RUN
    if not aside.is_dir():
        return
    for path in aside.iterdir():
        if not (Path(out) / path.name).exists():
            os.replace(path, Path(out) / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def get_rng_states(aug_gen: torch.Generator, device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, aug_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    aug_gen.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_training_state(out: Path, state: dict) -> None:
    torch_save_atomic(state, Path(out) / STATE_FILE)
    # The new run now has a checkpoint of its own: the run it replaces can go.
    shutil.rmtree(Path(out) / PREVIOUS_RUN, ignore_errors=True)


def _load(path: Path, what: str, remedy: str) -> dict:
    # Bounded and weights_only, as a model.pt is: fastmnist.model_file (which imports this module's errors).
    from fastmnist.model_file import MAX_TRAINING_STATE_BYTES, read_torch_file

    return read_torch_file(path, what, remedy, MAX_TRAINING_STATE_BYTES)


def load_training_state(out: Path) -> dict:
    out = Path(out)
    state = _load(out / STATE_FILE, "training checkpoint",
                  f"a run writes it at the end of each epoch and on Ctrl-C, so one killed during its first epoch "
                  f"leaves nothing to resume: start it anew with `fastmnist train --out {out} --overwrite` "
                  "(--resume needs the folder of a run started by `fastmnist train --out DIR`)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{out / STATE_FILE}: not a fastmnist training checkpoint (not a dict)")
    missing = {"config", "model", "optimizer", "scheduler", "rng", "history", "epoch", "step", "sums", "seen"} - set(state)
    if missing:
        raise CheckpointError(f"{out / STATE_FILE}: not a fastmnist training checkpoint (missing {sorted(missing)})")
    return state


def save_model(path: Path, model: torch.nn.Module, model_kwargs: dict) -> None:
    torch_save_atomic({"format": MODEL_FORMAT, "state_dict": model.state_dict(), "model_kwargs": model_kwargs}, path)


def load_model(path, device="cpu"):
    """(model in eval mode, model_kwargs) from a model.pt: fastmnist.model_file.load_model, bounded and checked."""
    from fastmnist.model_file import load_model as load_checked  # model_file imports this module's errors

    return load_checked(path, device)
