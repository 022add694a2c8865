"""A run's state (Run) and checkpoint.pt, its resumable copy: what is saved, and how it is checked and restored.

A run saves it after every epoch and when a signal stops it: the model, the
optimiser, the scheduler, the weight average, the RNG states, the history and
the position inside the epoch, so that `--resume` ends bit for bit like an
uninterrupted run. A damaged or foreign file fails in one line naming the part
that does not fit, never later with a traceback or a wrong position.
"""
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from fastmnist.checkpoint import CheckpointError, load_file
from fastmnist.errors import first_line
from fastmnist.ema import WeightAverage
from fastmnist.files import torch_save_atomic

if typing.TYPE_CHECKING:  # train imports this module
    from fastmnist.train import TrainConfig

STATE_FILE = "checkpoint.pt"
PARTS = {"config", "model", "optimizer", "scheduler", "rng", "history", "epoch", "step", "sums", "seen"}
REMEDY = "it is damaged or was written by another fastmnist version: start a new run with --overwrite or another --out"


@dataclass
class Run:
    """A run's data, model and optimiser, and its position: what an epoch advances and a checkpoint saves."""

    cfg: "TrainConfig"
    out: Path
    device: torch.device
    data: tuple  # train images, train labels, test images, test labels, all on the device
    model: torch.nn.Module
    kwargs: dict  # the model's build arguments, impl resolved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    aug_gen: torch.Generator
    steps_per_epoch: int
    ema: Optional[WeightAverage] = None  # the weight average, evaluated and saved, when cfg.ema_decay > 0
    history: list = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    sums: Optional[torch.Tensor] = None  # loss sum, correct: on the device, so a step needs no host sync
    seen: int = 0

    @property
    def final_model(self) -> torch.nn.Module:
        """What is evaluated and saved: the weight average where there is one, else the trained weights."""
        return self.model if self.ema is None else self.ema.module


def capture(run: Run, kind: str) -> dict:
    """The state of run; kind: "epoch" (at an epoch's end) or "interrupted"."""
    return {
        "config": asdict(run.cfg), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "ema": None if run.ema is None else run.ema.state_dict(), "scheduler": run.scheduler.state_dict(),
        "rng": get_rng_states(run.aug_gen, run.device), "history": run.history, "epoch": run.epoch,
        "step": run.step, "sums": run.sums.cpu(), "seen": run.seen, "kind": kind,
    }


def save(out: Path, state: dict) -> None:
    torch_save_atomic(state, Path(out) / STATE_FILE)


def load(out: Path) -> dict:
    out = Path(out)
    state = load_file(out / STATE_FILE, "training checkpoint",
                      f"a run writes it at the end of each epoch and on Ctrl-C, so one killed during its first epoch "
                      f"leaves nothing to resume: start it anew with `fastmnist train --out {out} --overwrite` "
                      "(--resume needs the folder of a run started by `fastmnist train --out DIR`)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{out / STATE_FILE}: not a fastmnist training checkpoint (not a dict)")
    missing = PARTS - set(state)
    if missing:
        raise CheckpointError(f"{out / STATE_FILE}: not a fastmnist training checkpoint (missing {sorted(missing)})")
    return state


def resumed_config(state: dict, cfg):
    """The saved run's configuration (a cfg-like TrainConfig), with what a resume may change (data_dir,
    progress) taken from cfg; checked by name, type and range before anything uses it."""
    where, saved, config_type = Path(cfg.out) / STATE_FILE, state["config"], type(cfg)
    known = {f.name for f in fields(config_type)}
    if not isinstance(saved, dict) or not set(saved) <= known:
        unknown = sorted(set(saved) - known) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(
            f"{where}: its configuration has unknown settings {unknown}; it was written by "
            "another fastmnist version: start a new run with --overwrite or another --out"
        )
    types = {f.name: _config_types(f.type) for f in fields(config_type)}
    wrong = [k for k, v in saved.items() if not isinstance(v, types[k])]
    positive = ("epochs", "batch_size", "eval_batch_size", "lr")  # a zero here divides by zero later
    wrong += [k for k in positive if k not in wrong and not saved.get(k, 1) > 0]
    if wrong:
        raise CheckpointError(
            f"{where}: its configuration holds values of the wrong type or out of range for "
            f"{sorted(wrong)}; it is damaged: start a new run with --overwrite or another --out"
        )
    return config_type(**{**saved, "progress": cfg.progress, "data_dir": cfg.data_dir or saved.get("data_dir")})


def _config_types(annotation) -> tuple:
    """The types a saved setting may have, from its annotation (Optional[int]: int or None; float: int too)."""
    types = tuple(t for t in typing.get_args(annotation) or (annotation,) if isinstance(t, type))
    return types + ((int,) if float in types else ())


def restore(run: Run, state: dict) -> None:
    """Load state into a freshly built run: its objects, then its position, each checked."""
    where = run.out / STATE_FILE
    try:
        run.model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: its weights do not fit this version's network ({first_line(exc)}); {REMEDY}"
                              ) from None
    part = "optimiser state"
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        part = "scheduler state"
        run.scheduler.load_state_dict(state["scheduler"])
        part = "weight average"
        if (run.ema is None) != (state["ema"] is None):
            raise ValueError("the run's settings and its checkpoint disagree on whether there is one")
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        part = "random number generator states"
        set_rng_states(state["rng"], run.aug_gen, run.device)
        part = "position"
        history, epoch, step, seen = list(state["history"]), state["epoch"], state["step"], state["seen"]
        sums = state["sums"].to(device=run.device, dtype=torch.float64)
    except Exception as exc:  # load_state_dict and set_state raise many types for a bad state: one line
        raise CheckpointError(f"{where}: its {part} cannot be restored ({first_line(exc)}); {REMEDY}") from None
    check_position(where, history, epoch, step, seen, sums, run.cfg.epochs, run.steps_per_epoch)
    run.history, run.epoch, run.step, run.sums, run.seen = history, epoch, step, sums, seen


def check_position(where, history, epoch, step, seen, sums, epochs, steps_per_epoch) -> None:
    if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, step, seen))
            and 0 <= epoch <= epochs and 0 <= step <= steps_per_epoch and len(history) == epoch and seen >= 0
            and sums.shape == (2,) and (epoch < epochs or step == 0)):
        raise CheckpointError(
            f"{where}: an impossible position (epoch {epoch!r}, step {step!r}, {len(history)} epochs of history, "
            f"for {epochs} epochs of {steps_per_epoch} steps); {REMEDY}"
        )


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
