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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmnist import checkpoint, ops
from fastmnist.data import load_mnist, random_affine, to_float_images
from fastmnist.device import device_name, resolve_device
from fastmnist.ema import WeightAverage
from fastmnist.layers import resolve_impl
from fastmnist.model import LAYOUTS, build_model, count_parameters
from fastmnist.recipes import RECIPES

MEMORY_FORMAT = torch.channels_last  # our kernels and oneDNN both prefer NHWC


@dataclass
class TrainConfig:
    """A run's settings. Those left None take the model's recipe (fastmnist.recipes) when the config is made."""

    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None  # OneCycleLR peak
    momentum: Optional[float] = None  # SGD, Nesterov
    weight_decay: Optional[float] = None
    pct_start: Optional[float] = None  # OneCycleLR warm-up fraction
    dropout: Optional[float] = None  # Dropout2d after each block
    label_smoothing: Optional[float] = None
    ema_decay: Optional[float] = None  # per-step decay of the weight average that is evaluated and saved; 0: none
    augment: Optional[bool] = None  # rotation 8 deg, scale 5%, shift 8%
    bn_recompute_batches: Optional[int] = None  # BN statistics of the evaluated weights from this many batches; 0: kept
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

    def __post_init__(self):
        if self.model not in RECIPES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(RECIPES)}")
        for name, value in RECIPES[self.model].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


class TrainingStopped(Exception):
    """Raised when a signal stopped training; the run was saved and can be resumed."""


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stopped at once, without saving; a KeyboardInterrupt, so cleanup still runs."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def run_folder(cfg: TrainConfig) -> Path:
    """The run's folder: cfg.out, else a new one under runs/ named by start time and seed."""
    return Path(cfg.out or Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-seed{cfg.seed}"))


def model_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """The model's build arguments, with impl decided once for this device (layers.resolve_impl)."""
    try:
        impl = resolve_impl(cfg.impl, device)
    except RuntimeError as exc:  # ops.require_fused: --impl fused where this build has no kernels for the device
        raise ValueError(f"--impl fused: {exc}") from exc
    return {"name": cfg.model, "impl": impl, "dropout": cfg.dropout}


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's shuffle, a pure function of (seed, epoch): nothing to save for resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def test_batches(model, images_u8, labels, batch_size=1000, memory_format=torch.contiguous_format):
    """(logits, labels) per batch, in order: the one pass that evaluate and the eval report share."""
    model.eval()
    for i in range(0, len(labels), batch_size):
        x = to_float_images(images_u8[i : i + batch_size]).contiguous(memory_format=memory_format)
        yield model(x), labels[i : i + batch_size]


@torch.no_grad()
def evaluate(model, images_u8, labels, batch_size=1000, memory_format=torch.contiguous_format):
    """(mean loss, accuracy) over a dataset held as uint8 on the model's device."""
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    for logits, y in test_batches(model, images_u8, labels, batch_size, memory_format):
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


@torch.no_grad()
def evaluate_with_probabilities(model, images_u8, labels, batch_size=1000, memory_format=torch.contiguous_format):
    """(mean loss, accuracy, softmax probabilities N x 10 on the CPU): evaluate's numbers from the same batches."""
    loss_sum = torch.zeros((), device=labels.device)
    probs = []
    for logits, y in test_batches(model, images_u8, labels, batch_size, memory_format):
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.float().softmax(1))
    probs = torch.cat(probs).cpu()
    correct = (probs.argmax(1) == labels.cpu()).sum().item()
    return loss_sum.item() / len(labels), correct / len(labels), probs


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
    """Train per cfg, writing checkpoints and metrics to its run folder; returns the metrics."""
    out = run_folder(cfg)
    if resume:
        checkpoint.restore_previous_run(out)  # an --overwrite killed before its first checkpoint: resume the old run
        state = checkpoint.load_training_state(out)
        return _train(resumed_config(state, cfg, out), out, state, log)
    checkpoint.prepare_out_dir(out, overwrite=overwrite)  # an old run is moved aside, not deleted
    try:
        return _train(replace(cfg, out=str(out)), out, None, log)  # the saved configuration names its folder
    except BaseException:
        checkpoint.restore_previous_run(out)  # nothing to restore once the new run has saved a checkpoint
        raise


def _train(cfg: TrainConfig, out: Path, state: Optional[dict], log) -> dict:
    """Start (or resume) the run, train it epoch by epoch, write its outputs."""
    run = start_run(cfg, out, state, log)
    with StopFlag(f"stopped at once, without saving; the last checkpoint in {out}, if any, is kept "
                  f"(resume it with: fastmnist train --resume {out})") as stop:
        while run.epoch < cfg.epochs:
            train_seconds = train_epoch(run, stop)
            end_epoch(run, train_seconds, log)
    return write_outputs(run, log)


@dataclass
class Run:
    """A run's data, model and optimiser, and its position: what an epoch advances and a checkpoint saves."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    data: tuple  # train images, train labels, test images, test labels, all on the device
    model: torch.nn.Module
    kwargs: dict  # the model's build arguments, impl resolved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    aug_gen: torch.Generator
    steps_per_epoch: int
    ema: Optional[WeightAverage] = None  # the weight average, when cfg.ema_decay > 0
    history: list = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    sums: Optional[torch.Tensor] = None  # loss sum, correct: on the device, so a step needs no host sync
    seen: int = 0

    @property
    def final_model(self) -> torch.nn.Module:
        """What is evaluated and saved: the weight average where there is one, else the trained weights."""
        return self.model if self.ema is None else self.ema.module

    def save(self, kind: str) -> None:
        checkpoint.save_training_state(self.out, {
            "config": asdict(self.cfg), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": checkpoint.get_rng_states(self.aug_gen, self.device),
            "history": self.history, "epoch": self.epoch, "step": self.step, "sums": self.sums.cpu(),
            "seen": self.seen, "kind": kind,
        })


def start_run(cfg: TrainConfig, out: Path, state: Optional[dict], log) -> Run:
    """Data on the device, a fresh model and optimiser, then the saved position when state is given.

    The order of the random draws here (seed, weights, then the saved RNG
    states) is what makes a resumed run end bit for bit like an uninterrupted one.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device, log)
    kwargs = model_kwargs(cfg, device)
    # Built on the CPU, then moved: a seed gives the same initial weights on every device.
    model = build_model(**kwargs).to(device, memory_format=MEMORY_FORMAT)
    steps_per_epoch = math.ceil(len(data[1]) / cfg.batch_size)
    optimizer, scheduler = build_optimiser(model, cfg, steps_per_epoch)
    run = Run(cfg, out, device, data, model, kwargs, optimizer, scheduler,
              torch.Generator(device=device).manual_seed(cfg.seed), steps_per_epoch, build_ema(model, cfg.ema_decay),
              sums=torch.zeros(2, device=device, dtype=torch.float64))
    if state is not None:
        run.history, run.epoch, run.step, run.sums, run.seen = restore_state(
            state, out, model, optimizer, scheduler, run.ema, run.aug_gen, device, cfg.epochs, steps_per_epoch)
        log(f"fastmnist: resuming {out} at epoch {run.epoch + 1}, step {run.step}/{steps_per_epoch}")
    log(f"fastmnist: model {cfg.model} ({count_parameters(model):,} parameters), impl {kwargs['impl']}"
        f"{kernel_path_note(kwargs['impl'], device)}, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads")
    return run


def kernel_path_note(impl: str, device: torch.device) -> str:
    """' (avx2 tiles)' and the like on the fused CPU path, so a run's log names the kernels that ran it."""
    if impl != "fused" or device.type != "cpu":
        return ""
    return f" ({ops.cpu_kernel_path()})"


def load_data(cfg: TrainConfig, device: torch.device, log) -> tuple:
    """(train images, train labels, test images, test labels) on the device, cut to cfg's limits."""
    data = load_mnist(cfg.data_dir, log=log)
    log(f"fastmnist: MNIST from {data.source}")
    return (data.train_images[: cfg.limit_train].to(device), data.train_labels[: cfg.limit_train].to(device),
            data.test_images[: cfg.limit_test].to(device), data.test_labels[: cfg.limit_test].to(device))


def nesterov_sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The training step's optimiser (the benchmarks time the same one): Nesterov SGD, fused.

    fused=True updates every parameter in one kernel, on the CPU as on CUDA:
    the default for-loop SGD issues five small ops per parameter, 0.40 ms a
    step for the default network's 24 tensors against 0.12 ms fused (2-core
    AMD EPYC). A torch without a fused kernel for the parameters' device
    refuses with a RuntimeError; the for-loop SGD then does the same update.
    A resumed run keeps the implementation it started with: the checkpoint's
    optimiser state carries it (load_state_dict restores the "fused" flag).
    """
    kwargs = dict(lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    params = list(params)
    try:
        return torch.optim.SGD(params, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.SGD(params, **kwargs)


def build_optimiser(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple:
    """Nesterov SGD under a one-cycle schedule that spans the whole run."""
    optimizer = nesterov_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start
    )
    return optimizer, scheduler


def build_ema(model: torch.nn.Module, decay: float) -> Optional[WeightAverage]:
    """The moving average of the weights and BN statistics, updated after every step (None when decay is 0)."""
    return None if decay == 0 else WeightAverage(model, decay)


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


def restore_state(state, out, model, optimizer, scheduler, ema, aug_gen, device, epochs, steps_per_epoch):
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
        part = "weight average"
        if (ema is None) != (state["ema"] is None):
            raise ValueError("the run's settings and its checkpoint disagree on whether there is one")
        if ema is not None:
            ema.load_state_dict(state["ema"])
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


def train_epoch(run: Run, stop: StopFlag) -> float:
    """Train from run's position to the end of its epoch; returns the seconds it took.

    A signal stops it at the next step boundary: the position is saved and
    TrainingStopped raised. A non-finite loss raises NonFiniteLoss, saving nothing.
    """
    cfg, model, (train_x, train_y, _, _) = run.cfg, run.model, run.data
    model.train()
    perm = epoch_permutation(cfg.seed, run.epoch, len(train_y)).to(run.device)
    bad_step = torch.full((), -1, device=run.device, dtype=torch.long)
    t0 = time.perf_counter()
    bar = tqdm(range(run.step, run.steps_per_epoch), initial=run.step, total=run.steps_per_epoch,
               disable=not cfg.progress, desc=f"epoch {run.epoch + 1}/{cfg.epochs}", unit="step", leave=False,
               dynamic_ncols=True)
    for step in bar:
        run.step = step
        if stop.signal:
            break
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = to_float_images(train_x[idx])
        if cfg.augment:
            x = random_affine(x, run.aug_gen)
        x = x.contiguous(memory_format=MEMORY_FORMAT)
        y = train_y[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(model)
        with torch.no_grad():
            finite = torch.isfinite(loss)
            bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, step))
            run.sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        run.seen += len(y)
        if step % 25 == 24 or step == run.steps_per_epoch - 1:  # one host sync every 25 steps
            s = run.sums.tolist()
            if int(bad_step) >= 0:
                raise NonFiniteLoss(
                    f"loss became non-finite at epoch {run.epoch + 1}, step {int(bad_step) + 1}; training stopped "
                    f"and the last good checkpoint in {run.out} was kept. Try a lower --lr."
                )
            bar.set_postfix(loss=f"{s[0] / run.seen:.4f}", acc=f"{s[1] / run.seen:.4f}",
                            img_s=f"{run.seen / (time.perf_counter() - t0 + 1e-9):.0f}")
    else:
        run.step = run.steps_per_epoch
    bar.close()
    if stop.signal:
        run.save("interrupted")
        raise TrainingStopped(
            f"{stop.signal}: stopped at epoch {run.epoch + 1}, step {run.step}/{run.steps_per_epoch}; saved to "
            f"{run.out / checkpoint.STATE_FILE}. Resume with: fastmnist train --resume {run.out}"
        )
    return time.perf_counter() - t0


def recompute_bn_statistics(run: Run) -> float:
    """Replace the BN running statistics of the evaluated model by its own, on cfg.bn_recompute_batches
    un-augmented training batches of the epoch's shuffle; returns the seconds it took.

    The weight average also averages the BN statistics, which belong to other
    weights: those the model had over the last ~1/(1 - decay) steps. A burst of
    large activations in that window moves them for a thousand steps (seed 0 of
    default: 97.91% after epoch 7, 99.48% after epoch 8). torch.optim.swa_utils.update_bn
    recomputes them as SWA does: it resets them, then takes the cumulative
    average of the batch statistics over the batches. Training never reads
    the average's BN statistics, so it is untouched; the result depends only on
    the averaged weights, the seed and the epoch, and the checkpoint saved after
    it holds it, so a resumed run ends as an uninterrupted one.
    """
    cfg, (train_x, _, _, _) = run.cfg, run.data
    t0 = time.perf_counter()
    perm = epoch_permutation(cfg.seed, run.epoch, len(train_x)).to(run.device)
    n = min(cfg.bn_recompute_batches * cfg.batch_size, len(perm))
    batches = (to_float_images(train_x[perm[i : i + cfg.batch_size]]).contiguous(memory_format=MEMORY_FORMAT)
               for i in range(0, n, cfg.batch_size))
    torch.optim.swa_utils.update_bn(batches, run.final_model)
    return time.perf_counter() - t0


def end_epoch(run: Run, train_seconds: float, log) -> None:
    """Evaluate, record and log the epoch, move to the next one and save the checkpoint."""
    cfg, (_, _, test_x, test_y) = run.cfg, run.data
    s = run.sums.tolist()
    bn_seconds = recompute_bn_statistics(run) if cfg.bn_recompute_batches else 0.0  # not training time: reported apart
    test_loss, test_acc = evaluate(run.final_model, test_x, test_y, cfg.eval_batch_size, MEMORY_FORMAT)
    record = {
        "epoch": run.epoch + 1, "train_loss": s[0] / run.seen, "train_acc": s[1] / run.seen, "test_loss": test_loss,
        "test_acc": test_acc, "epoch_seconds": train_seconds,
        "bn_recompute_seconds": bn_seconds, "lr_end": run.scheduler.get_last_lr()[0],
    }
    run.history.append(record)
    log(f"epoch {run.epoch + 1:2d}/{cfg.epochs}  train loss {record['train_loss']:.4f}  "
        f"test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%  {train_seconds:.1f}s")
    run.epoch, run.step, run.seen = run.epoch + 1, 0, 0
    run.sums.zero_()
    run.save("epoch")


def write_outputs(run: Run, log) -> dict:
    """metrics.json, model.pt and curves.png in the run folder; returns the metrics."""
    history, device = run.history, run.device
    metrics = {
        "config": asdict(run.cfg), "model_kwargs": run.kwargs, "layout": LAYOUTS[run.cfg.model],
        "parameters": count_parameters(run.model),
        "epochs": history, "final_test_acc": history[-1]["test_acc"],
        "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
        "total_train_seconds": sum(r["epoch_seconds"] for r in history), "torch_version": torch.__version__,
        "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(),
    }
    checkpoint.write_json_atomic(run.out / "metrics.json", metrics)
    checkpoint.save_model(run.out / "model.pt", run.final_model, run.kwargs)
    plot_curves(history, run.out / "curves.png", log)
    log(f"fastmnist: final test accuracy {100 * metrics['final_test_acc']:.2f}% -> {run.out}")
    return metrics


def plot_curves(history, path, log=print) -> bool:
    """Loss and accuracy per epoch; skipped, saying so, where matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"fastmnist: {Path(path).name} skipped: pip install matplotlib (the `plot` extra)")
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


def evaluate_checkpoint(path, data_dir=None, device="auto", log=print, predictions=False) -> dict:
    """Test accuracy of a saved model.pt; with predictions, also the test set and the model's probabilities
    ("images" uint8, "labels", "probabilities" N x 10, all on the CPU) for fastmnist.report."""
    dev = resolve_device(device)
    model, kwargs = checkpoint.load_model(path, device=dev)
    data = load_mnist(data_dir, log=log)
    extra = {}
    if predictions:
        loss, acc, probs = evaluate_with_probabilities(model, data.test_images.to(dev), data.test_labels.to(dev),
                                                       memory_format=MEMORY_FORMAT)
        extra = {"images": data.test_images.cpu(), "labels": data.test_labels.cpu(), "probabilities": probs}
    else:
        loss, acc = evaluate(model, data.test_images.to(dev), data.test_labels.to(dev), memory_format=MEMORY_FORMAT)
    if not math.isfinite(loss):  # finite weights can still make NaN (a negative running variance, an overflow)
        raise checkpoint.CheckpointError(
            f"{path}: the model is broken: its outputs on the test set are NaN or infinite, so its accuracy "
            f"({100 * acc:.2f}%) means nothing; retrain it (`fastmnist train`) or pass another model.pt"
        )
    return {"test_loss": loss, "test_acc": acc, "model_kwargs": kwargs, **extra}
