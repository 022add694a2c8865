"""Training and evaluation: read top to bottom.

The whole dataset lives on the training device as uint8; a batch is an index
into it, augmented there in one batched call. Metrics are accumulated on the
device so an epoch has no per-step host synchronisation. After every epoch a
checkpoint (model, optimiser, scheduler, RNG states, metrics so far) is written
atomically; Ctrl-C or SIGTERM stops at the next step boundary, saves the
position inside the epoch, and `--resume` continues to the same final weights
as an uninterrupted run.
"""
import math
import os
import signal
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmnist import checkpoint, ops
from fastmnist.data import load_mnist, random_affine, to_float_images
from fastmnist.layers import resolve_impl
from fastmnist.model import build_model, count_parameters


@dataclass
class TrainConfig:
    epochs: int = 18
    batch_size: int = 128
    lr: float = 0.2  # OneCycleLR peak
    momentum: float = 0.9  # SGD, Nesterov
    weight_decay: float = 5e-5
    pct_start: float = 0.2  # OneCycleLR warm-up fraction
    dropout: float = 0.05  # Dropout2d after each block
    augment: bool = True  # rotation 8 deg, scale 5%, shift 8%
    seed: int = 0
    model: str = "default"
    impl: str = "auto"  # fused | stock | auto (fused where built)
    device: str = "auto"  # auto | cpu | cuda
    data_dir: Optional[str] = None
    out: Optional[str] = None
    eval_batch_size: int = 1000
    limit_train: Optional[int] = None  # first N training images only (tests, smoke runs)
    limit_test: Optional[int] = None
    progress: bool = True


class TrainingStopped(Exception):
    """Raised when a signal stopped training; the run was saved and can be resumed."""


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stopped at once, without saving; a KeyboardInterrupt, so cleanup still runs."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def model_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """The model's build arguments, with impl resolved for this device."""
    impl = resolve_impl(cfg.impl)
    if impl == "fused" and not ops.fused_supports(device.type):
        if cfg.impl == "fused":
            raise ValueError(f"--impl fused: this build of fastmnist._C has no {device.type.upper()} kernels; "
                             "reinstall with FORCE_CUDA=1 and the CUDA toolkit, or use --impl stock")
        impl = "stock"  # auto: the stock layers where our kernels are not built
    return {"name": cfg.model, "impl": impl, "dropout": cfg.dropout}


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's shuffle, a pure function of (seed, epoch): nothing to save for resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def evaluate(model, images_u8, labels, batch_size=1000, memory_format=torch.contiguous_format):
    """(mean loss, accuracy) over a dataset held as uint8 on the model's device."""
    model.eval()
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    for i in range(0, len(labels), batch_size):
        x = to_float_images(images_u8[i : i + batch_size]).contiguous(memory_format=memory_format)
        logits = model(x)
        y = labels[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks at each step boundary.

    A second signal stops at once, without saving: it raises TrainingAborted,
    whose message (say where the last checkpoint is) the caller gives.
    """

    def __init__(self, second_signal_message: str = "stopped at once, without saving"):
        self.signal = None
        self.second_signal_message = second_signal_message
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now, without saving
            raise TrainingAborted(f"{signal.Signals(signum).name} again: {self.second_signal_message}")
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train per cfg, writing checkpoints and metrics to cfg.out; returns the metrics."""
    out = Path(cfg.out or Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-seed{cfg.seed}"))
    if resume:
        checkpoint.restore_previous_run(out)  # an --overwrite killed before its first checkpoint: resume the old run
        state = checkpoint.load_training_state(out)
        cfg = resumed_config(state, cfg, out)
        return _train(cfg, out, state, log)
    checkpoint.prepare_out_dir(out, overwrite=overwrite)  # an old run is moved aside, not deleted
    try:
        return _train(cfg, out, None, log)
    except BaseException:
        checkpoint.restore_previous_run(out)  # nothing to restore once the new run has saved a checkpoint
        raise


def resumed_config(state: dict, cfg: TrainConfig, out: Path) -> TrainConfig:
    """The saved run's configuration, with what a resume may change (data_dir, progress) from cfg."""
    saved = state["config"]
    known = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved, dict) or not set(saved) <= known:
        unknown = sorted(set(saved) - known) if isinstance(saved, dict) else type(saved).__name__
        raise checkpoint.CheckpointError(
            f"{out / checkpoint.STATE_FILE}: its configuration has unknown settings {unknown}; it was written by "
            "another fastmnist version: start a new run with --overwrite or another --out"
        )
    types = {f.name: _config_types(f.type) for f in fields(TrainConfig)}
    wrong = [k for k, v in saved.items() if not isinstance(v, types[k])]
    positive = ("epochs", "batch_size", "eval_batch_size", "lr")  # a zero here divides by zero later
    wrong += [k for k in positive if k not in wrong and not saved.get(k, 1) > 0]
    if wrong:
        raise checkpoint.CheckpointError(
            f"{out / checkpoint.STATE_FILE}: its configuration holds values of the wrong type or out of range for "
            f"{sorted(wrong)}; it is damaged: start a new run with --overwrite or another --out"
        )
    return TrainConfig(**{**saved, "progress": cfg.progress, "data_dir": cfg.data_dir or saved.get("data_dir")})


def _config_types(annotation) -> tuple:
    """The types a saved setting may have, from its annotation (Optional[int]: int or None; float: int too)."""
    types = tuple(t for t in typing.get_args(annotation) or (annotation,) if isinstance(t, type))
    return types + ((int,) if float in types else ())


def restore_state(state, out, model, optimizer, scheduler, aug_gen, device, epochs, steps_per_epoch):
    """(history, epoch, step, sums, seen) from a checkpoint, into the freshly built objects.

    A damaged or foreign checkpoint fails here in one line naming the part that
    does not fit, never later with a traceback or a wrong position.
    """
    where = out / checkpoint.STATE_FILE
    remedy = ("it is damaged or was written by another fastmnist version: "
              "start a new run with --overwrite or another --out")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as exc:
        raise checkpoint.CheckpointError(
            f"{where}: its weights do not fit this version's network ({_first_line(exc)[:160]}); {remedy}"
        ) from None
    part = "optimiser state"
    try:
        optimizer.load_state_dict(state["optimizer"])
        part = "scheduler state"
        scheduler.load_state_dict(state["scheduler"])
        part = "random number generator states"
        checkpoint.set_rng_states(state["rng"], aug_gen, device)
        part = "position"
        history, epoch, step, seen = list(state["history"]), state["epoch"], state["step"], state["seen"]
        sums = state["sums"].to(device=device, dtype=torch.float64)
    except Exception as exc:  # load_state_dict and set_state raise many types for a bad state: one line
        raise checkpoint.CheckpointError(
            f"{where}: its {part} cannot be restored ({_first_line(exc)[:160]}); {remedy}"
        ) from None
    if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, step, seen))
            and 0 <= epoch <= epochs and 0 <= step <= steps_per_epoch and len(history) == epoch and seen >= 0
            and sums.shape == (2,) and (epoch < epochs or step == 0)):
        raise checkpoint.CheckpointError(
            f"{where}: an impossible position (epoch {epoch!r}, step {step!r}, {len(history)} epochs of history, "
            f"for {epochs} epochs of {steps_per_epoch} steps); {remedy}"
        )
    return history, epoch, step, sums, seen


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _train(cfg: TrainConfig, out: Path, state: Optional[dict], log) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last  # our kernels and oneDNN both prefer NHWC

    data = load_mnist(cfg.data_dir, log=log)
    log(f"fastmnist: MNIST from {data.source}")
    train_x = data.train_images[: cfg.limit_train].to(device)
    train_y = data.train_labels[: cfg.limit_train].to(device)
    test_x = data.test_images[: cfg.limit_test].to(device)
    test_y = data.test_labels[: cfg.limit_test].to(device)

    kwargs = model_kwargs(cfg, device)
    model = build_model(**kwargs).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start
    )
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history, epoch, step = [], 0, 0
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct: on the device, no sync
    seen = 0
    if state is not None:
        history, epoch, step, sums, seen = restore_state(
            state, out, model, optimizer, scheduler, aug_gen, device, cfg.epochs, steps_per_epoch)
        log(f"fastmnist: resuming {out} at epoch {epoch + 1}, step {step}/{steps_per_epoch}")

    n_params = count_parameters(model)
    log(f"fastmnist: model {cfg.model} ({n_params:,} parameters), impl {kwargs['impl']}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    def save(kind):
        checkpoint.save_training_state(out, {
            "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": checkpoint.get_rng_states(aug_gen, device),
            "history": history, "epoch": epoch, "step": step, "sums": sums.cpu(), "seen": seen, "kind": kind,
        })

    with StopFlag(f"stopped at once, without saving; the last checkpoint in {out}, if any, is kept "
                  f"(resume it with: fastmnist train --resume {out})") as stop:
        while epoch < cfg.epochs:
            model.train()
            perm = epoch_permutation(cfg.seed, epoch, len(train_y)).to(device)
            bad_step = torch.full((), -1, device=device, dtype=torch.long)
            t0 = time.perf_counter()
            bar = tqdm(range(step, steps_per_epoch), initial=step, total=steps_per_epoch, disable=not cfg.progress,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False, dynamic_ncols=True)
            for step in bar:
                if stop.signal:
                    break
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = to_float_images(train_x[idx])
                if cfg.augment:
                    x = random_affine(x, aug_gen)
                x = x.contiguous(memory_format=memory_format)
                y = train_y[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    finite = torch.isfinite(loss)
                    bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, step))
                    sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
                seen += len(y)
                if step % 25 == 24 or step == steps_per_epoch - 1:  # one host sync every 25 steps
                    s = sums.tolist()
                    if int(bad_step) >= 0:
                        raise NonFiniteLoss(
                            f"loss became non-finite at epoch {epoch + 1}, step {int(bad_step) + 1}; training stopped "
                            f"and the last good checkpoint in {out} was kept. Try a lower --lr."
                        )
                    bar.set_postfix(loss=f"{s[0] / seen:.4f}", acc=f"{s[1] / seen:.4f}",
                                    img_s=f"{seen / (time.perf_counter() - t0 + 1e-9):.0f}")
            else:
                step = steps_per_epoch
            bar.close()
            if stop.signal:
                save("interrupted")
                raise TrainingStopped(
                    f"{stop.signal}: stopped at epoch {epoch + 1}, step {step}/{steps_per_epoch}; saved to "
                    f"{out / checkpoint.STATE_FILE}. Resume with: fastmnist train --resume {out}"
                )
            train_seconds = time.perf_counter() - t0
            s = sums.tolist()
            test_loss, test_acc = evaluate(model, test_x, test_y, cfg.eval_batch_size, memory_format)
            record = {
                "epoch": epoch + 1, "train_loss": s[0] / seen, "train_acc": s[1] / seen, "test_loss": test_loss,
                "test_acc": test_acc, "epoch_seconds": train_seconds, "lr_end": scheduler.get_last_lr()[0],
            }
            history.append(record)
            log(f"epoch {epoch + 1:2d}/{cfg.epochs}  train loss {record['train_loss']:.4f}  "
                f"test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%  {train_seconds:.1f}s")
            epoch, step, seen = epoch + 1, 0, 0
            sums.zero_()
            save("epoch")

    metrics = {
        "config": asdict(cfg), "model_kwargs": kwargs, "parameters": n_params, "epochs": history,
        "final_test_acc": history[-1]["test_acc"], "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
        "total_train_seconds": sum(r["epoch_seconds"] for r in history), "torch_version": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }
    checkpoint.write_json_atomic(out / "metrics.json", metrics)
    checkpoint.save_model(out / "model.pt", model, kwargs)
    plot_curves(history, out / "curves.png")
    log(f"fastmnist: final test accuracy {100 * metrics['final_test_acc']:.2f}% -> {out}")
    return metrics


def plot_curves(history, path) -> bool:
    """Loss and accuracy per epoch; skipped (False) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax1.legend()
    ax2.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train (augmented)")
    ax2.plot(epochs, [100 * r["test_acc"] for r in history], "o-", label="test")
    ax2.axhline(99.4, color="gray", ls="--", lw=1, label="99.4% target")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(97, 100))
    ax2.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def evaluate_checkpoint(path, data_dir=None, device="auto", log=print) -> dict:
    """Test accuracy of a saved model.pt."""
    dev = resolve_device(device)
    model, kwargs = checkpoint.load_model(path, device=dev)
    data = load_mnist(data_dir, log=log)
    loss, acc = evaluate(model, data.test_images.to(dev), data.test_labels.to(dev),
                         memory_format=torch.channels_last)
    if not math.isfinite(loss):  # finite weights can still make NaN (a negative running variance, an overflow)
        raise checkpoint.CheckpointError(
            f"{path}: the model is broken: its outputs on the test set are NaN or infinite, so its accuracy "
            f"({100 * acc:.2f}%) means nothing; retrain it (`fastmnist train`) or pass another model.pt"
        )
    return {"test_loss": loss, "test_acc": acc, "model_kwargs": kwargs}
