"""Time training steps of the default model: stock eager (NCHW), stock
channels_last, torch.compile and our fused operator, interleaved in one process
on the same batches. Reports the median step time, the epoch time it implies
(ceil(60000 / batch size) steps: 469 at 128) and each variant's ratio to stock
eager; writes JSON under benchmarks/results/ (or $OUT) that records the git
commit measured, the CPU model, threads and ATen CPU capability.

    python benchmarks/epoch_time.py [--device cpu|cuda] [--rounds 30] [--warmup 2] [--steps 4]

Real MNIST batches by default (stops when MNIST is absent); --random-images
times on random pixels instead, and the JSON says so.

Rounds are short (4 steps per variant) so that the machine's drift, which on
a shared 2-core VM comes in bursts of seconds, falls on every variant alike.
"""
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import (add_out_argument, interleaved_step_times, machine_line, machine_meta,  # noqa: E402
                    print_step_table, step_summary, timing_method, timing_parser, write_record)

from fastmnist import ops  # noqa: E402
from fastmnist.data import MNISTDataError, load_mnist, random_affine, to_float_images  # noqa: E402
from fastmnist.model import build_model  # noqa: E402
from fastmnist.recipes import RECIPES  # noqa: E402
from fastmnist.optim import nesterov_sgd  # noqa: E402

MNIST_TRAIN_IMAGES = 60000


def make_batches(n_batches, batch_size, device, data_dir, random_images):
    """Augmented real MNIST batches (random pixels only when asked), built once, shared by all variants."""
    gen = torch.Generator().manual_seed(0)
    if random_images:
        images = torch.rand(n_batches * batch_size, 1, 28, 28, generator=gen)
        labels = torch.randint(0, 10, (n_batches * batch_size,), generator=gen)
    else:
        mnist = load_mnist(data_dir, log=lambda *_: None)  # MNISTDataError names the remedy
        idx = torch.randperm(len(mnist.train_labels), generator=gen)[: n_batches * batch_size]
        images, labels = to_float_images(mnist.train_images[idx]), mnist.train_labels[idx]
        images = random_affine(images, gen)
    return [(images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
            for i in range(0, n_batches * batch_size, batch_size)]


def make_variant(impl, memory_format, compiled, device):
    torch.manual_seed(0)
    recipe = RECIPES["default"]  # the training step `fastmnist train` takes, less its weight-average update
    model = build_model(impl=impl, dropout=recipe["dropout"], device=device).to(memory_format=memory_format)
    opt = nesterov_sgd(model.parameters(), 0.05, recipe["momentum"], recipe["weight_decay"])
    forward = torch.compile(model) if compiled else model

    def step(x, y):
        x = x.contiguous(memory_format=memory_format)
        loss = F.cross_entropy(forward(x), y, label_smoothing=recipe["label_smoothing"])
        for p in model.parameters():
            p.grad = None
        loss.backward()
        opt.step()
        return loss

    return step


def _fused_sgd(device) -> bool:
    """Whether the training step's optimiser (fastmnist.optim.nesterov_sgd) runs fused on this device."""
    return bool(nesterov_sgd([torch.zeros(1, device=device)], 0.1, 0.9, 0.0).defaults.get("fused"))


def parse_args():
    parser = timing_parser(__doc__)
    parser.add_argument("--data-dir")
    parser.add_argument("--random-images", action="store_true",
                        help="time on random pixels instead of real MNIST (recorded in the JSON)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.warmup < 0 or args.steps < 1 or args.batch_size < 1:
        parser.error("--warmup must be >= 0, --steps and --batch-size >= 1")
    if (args.rounds - args.warmup) * args.steps < 2:
        parser.error(f"--rounds {args.rounds} with --warmup {args.warmup} and --steps {args.steps} leaves "
                     f"{max(0, args.rounds - args.warmup) * args.steps} timed steps per variant; need at least 2")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    cl = torch.channels_last
    variants = {
        "stock eager (NCHW)": ("stock", torch.contiguous_format, False),
        "stock channels_last": ("stock", cl, False),
    }
    if not args.no_compile:
        variants["torch.compile (stock, channels_last)"] = ("stock", cl, True)
    if ops.fused_available():
        variants["fused (ours)"] = ("fused", cl, False)
    else:
        print(f"fused variant skipped: {ops.fused_unavailable_reason()}")

    try:
        batches = make_batches(args.steps, args.batch_size, device, args.data_dir, args.random_images)
    except MNISTDataError as exc:
        sys.exit(f"epoch_time: {exc}\n(or pass --random-images to time on random pixels)")
    steps, compile_seconds = {}, {}
    for name, spec in variants.items():
        steps[name] = make_variant(*spec, device)
        t0 = time.perf_counter()
        steps[name](*batches[0])  # first call: compiles where compiled
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_seconds[name] = time.perf_counter() - t0

    samples = interleaved_step_times(steps, batches, args.rounds, args.warmup, device)

    steps_per_epoch = math.ceil(MNIST_TRAIN_IMAGES / args.batch_size)
    base = statistics.median(samples["stock eager (NCHW)"])
    rows = []
    for name, ts in samples.items():
        med = statistics.median(ts)
        rows.append({"variant": name, **step_summary(ts),
                     "mean_step_ms": 1e3 * statistics.fmean(ts), "stdev_ms": 1e3 * statistics.stdev(ts),
                     "epoch_seconds": med * steps_per_epoch, "ratio_to_stock_eager": med / base,
                     "first_call_seconds": compile_seconds[name], "samples": len(ts)})
    meta = {
        **machine_meta("epoch_time", device),
        "fused_cpu_kernel_path": getattr(ops, "cpu_kernel_path", lambda: None)() if ops.fused_available() else None,
        "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch,
        "optimizer": "Nesterov SGD, fused" if _fused_sgd(device) else "Nesterov SGD, for-loop",
        "images": "random" if args.random_images else "mnist",
        "rounds": args.rounds, "warmup_rounds": args.warmup, "rounds_timed": args.rounds - args.warmup,
        "steps_per_round": args.steps,
        "method": timing_method(args.warmup),
    }
    path = write_record(args.out, f"epoch_time-{args.device}", {"meta": meta, "results": rows})

    print(f"\n{machine_line(meta)}, batch {args.batch_size}, {meta['images']} images, "
          f"{len(samples['stock eager (NCHW)'])} timed steps per variant")
    print_step_table(rows, [("epoch (s)", lambda r: f"{r['epoch_seconds']:.1f}"),
                            ("vs stock eager", lambda r: f"{r['ratio_to_stock_eager']:.2f}x"),
                            ("first call (s)", lambda r: f"{r['first_call_seconds']:.1f}")])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
