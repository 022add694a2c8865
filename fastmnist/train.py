"""Training, read top to bottom: the config, the data, the model, the loop.

The whole dataset lives on the training device as uint8; a batch is an index
into it, augmented there in one batched call. Metrics are accumulated on the
device so an epoch has no per-step host synchronisation. After every epoch a
checkpoint is written (fastmnist.training_state); Ctrl-C or SIGTERM stops at
the next step boundary (fastmnist.stopping), saves the position inside the
epoch, and `--resume` continues to the same final weights as an uninterrupted
run. The run's folder, its lock and --overwrite are fastmnist.runs.
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmnist import ops, runs, training_state
from fastmnist.checkpoint import save_model
from fastmnist.data import load_mnist, random_affine, to_float_images
from fastmnist.device import device_name, resolve_device
from fastmnist.ema import WeightAverage, recompute_bn_statistics
from fastmnist.evaluation import evaluate
from fastmnist.files import write_json_atomic
from fastmnist.layers import resolve_impl
from fastmnist.model import LAYOUTS, MEMORY_FORMAT, build_model, count_parameters
from fastmnist.optim import nesterov_sgd
from fastmnist.plots import plot_curves
from fastmnist.recipes import RECIPES
from fastmnist.stopping import STOP, TrainingStopped
from fastmnist.training_state import Run


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


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train per cfg in its run folder (with resume: continue the run saved there); returns the metrics."""
    out = runs.run_folder(cfg)
    with STOP.held(f"stopped at once, without saving; {out} holds the last checkpoint, if any, or the run it "
                   f"replaced (resume with: fastmnist train --resume {out})"):
        if STOP.signal:  # it came while Python was starting
            raise TrainingStopped(f"{STOP.signal}: stopped before training began; nothing in {out} was changed")
        with runs.claim(out, resume=resume, overwrite=overwrite):
            state = training_state.load(out) if resume else None
            cfg = training_state.resumed_config(state, cfg) if resume else replace(cfg, out=str(out))
            run = start_run(cfg, out, state, log)
            while run.epoch < cfg.epochs:
                train_seconds = train_epoch(run)
                end_epoch(run, train_seconds, log)
            return write_outputs(run, log)


# --- the data ---

def load_data(cfg: TrainConfig, device: torch.device, log) -> tuple:
    """(train images, train labels, test images, test labels) on the device, cut to cfg's limits."""
    data = load_mnist(cfg.data_dir, log=log)
    log(f"fastmnist: MNIST from {data.source}")
    return (data.train_images[: cfg.limit_train].to(device), data.train_labels[: cfg.limit_train].to(device),
            data.test_images[: cfg.limit_test].to(device), data.test_labels[: cfg.limit_test].to(device))


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's shuffle, a pure function of (seed, epoch): nothing to save for resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# --- the model and its optimiser ---

def model_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """The model's build arguments, with impl decided once for this device (layers.resolve_impl)."""
    try:
        impl = resolve_impl(cfg.impl, device)
    except RuntimeError as exc:  # ops.require_fused: --impl fused where this build has no kernels for the device
        raise ValueError(f"--impl fused: {exc}") from exc
    return {"name": cfg.model, "impl": impl, "dropout": cfg.dropout}


def build_optimiser(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple:
    """Nesterov SGD under a one-cycle schedule that spans the whole run."""
    optimizer = nesterov_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start
    )
    return optimizer, scheduler


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
    ema = None if cfg.ema_decay == 0 else WeightAverage(model, cfg.ema_decay)
    run = Run(cfg, out, device, data, model, kwargs, optimizer, scheduler,
              torch.Generator(device=device).manual_seed(cfg.seed), steps_per_epoch, ema,
              sums=torch.zeros(2, device=device, dtype=torch.float64))
    if state is not None:
        training_state.restore(run, state)
        log(f"fastmnist: resuming {out} at epoch {run.epoch + 1}, step {run.step}/{steps_per_epoch}")
    kernels = f" ({ops.cpu_kernel_path()})" if kwargs["impl"] == "fused" and device.type == "cpu" else ""
    log(f"fastmnist: model {cfg.model} ({count_parameters(model):,} parameters), impl {kwargs['impl']}{kernels}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return run


# --- the loop ---

def train_epoch(run: Run) -> float:
    """Train from run's position to the end of its epoch; returns the seconds it took.

    A signal stops it at the next step boundary (runs.stop_here). A non-finite loss
    raises NonFiniteLoss, saving nothing.
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
        if STOP.signal:
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
            if int(bad_step) >= 0:  # runs.claim puts back a run this one was replacing
                kept = (f"the run it was replacing is back in {run.out}" if runs.replacing(run.out)
                        else f"the last good checkpoint in {run.out}, if any, was kept")
                raise NonFiniteLoss(f"loss became non-finite at epoch {run.epoch + 1}, step {int(bad_step) + 1}; "
                                    f"training stopped and {kept}. Try a lower --lr.")
            bar.set_postfix(loss=f"{s[0] / run.seen:.4f}", acc=f"{s[1] / run.seen:.4f}",
                            img_s=f"{run.seen / (time.perf_counter() - t0 + 1e-9):.0f}")
    else:
        run.step = run.steps_per_epoch
    bar.close()
    if STOP.signal:
        runs.stop_here(run, STOP.signal)  # raises TrainingStopped
    return time.perf_counter() - t0


def end_epoch(run: Run, train_seconds: float, log) -> None:
    """Evaluate, record and log the epoch, move to the next one and save the checkpoint."""
    cfg, (_, _, test_x, test_y) = run.cfg, run.data
    s = run.sums.tolist()
    bn_seconds = 0.0  # not training time: reported apart
    if cfg.bn_recompute_batches:
        order = epoch_permutation(cfg.seed, run.epoch, len(run.data[0])).to(run.device)
        bn_seconds = recompute_bn_statistics(run.final_model, run.data[0], order, cfg.bn_recompute_batches,
                                             cfg.batch_size, MEMORY_FORMAT)
    test = evaluate(run.final_model, test_x, test_y, cfg.eval_batch_size)
    record = {
        "epoch": run.epoch + 1, "train_loss": s[0] / run.seen, "train_acc": s[1] / run.seen,
        "test_loss": test["test_loss"], "test_acc": test["test_acc"], "epoch_seconds": train_seconds,
        "bn_recompute_seconds": bn_seconds, "lr_end": run.scheduler.get_last_lr()[0],
    }
    run.history.append(record)
    log(f"epoch {run.epoch + 1:2d}/{cfg.epochs}  train loss {record['train_loss']:.4f}  "
        f"test loss {record['test_loss']:.4f}  test acc {100 * record['test_acc']:.2f}%  {train_seconds:.1f}s")
    run.epoch, run.step, run.seen = run.epoch + 1, 0, 0
    run.sums.zero_()
    training_state.save(run.out, training_state.capture(run, "epoch"))
    runs.drop_previous_run(run.out)  # this run now has an epoch of its own: the one it replaces goes


def write_outputs(run: Run, log) -> dict:
    """metrics.json, model.pt and curves.png in the run folder; returns the metrics."""
    history, device = run.history, run.device
    metrics = {
        "config": asdict(run.cfg), "model_kwargs": run.kwargs, "layout": LAYOUTS[run.cfg.model],
        "parameters": count_parameters(run.model), "epochs": history, "final_test_acc": history[-1]["test_acc"],
        "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
        "total_train_seconds": sum(r["epoch_seconds"] for r in history), "torch_version": torch.__version__,
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
    }
    write_json_atomic(run.out / "metrics.json", metrics)
    save_model(run.out / "model.pt", run.final_model, run.kwargs)
    plot_curves(history, run.out / "curves.png", log)
    log(f"fastmnist: final test accuracy {100 * metrics['final_test_acc']:.2f}% -> {run.out}")
    return metrics
