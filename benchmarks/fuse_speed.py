"""Time a training step of a network nobody designed for fastmnist, stock and through fastmnist.fuse.

The network is the padded 32/64-channel net below, which tests/test_fusion.py checks too: four 3x3
convolutions with padding 1, three Conv-ReLU-BN blocks and one Conv-ReLU-AvgPool, a linear
classifier; fuse() replaces all four runs. The variants (stock NCHW, stock channels_last, fused)
take SGD steps on the same random 28x28 batches, interleaved round by round so that the
machine's drift falls on each alike. Writes JSON under benchmarks/results/ (or $OUT) with the
git commit, the CPU model (family and model numbers), threads, torch version, and the median
step time of each variant with its ratio to stock channels_last.

    python benchmarks/fuse_speed.py [--device cpu|cuda] [--rounds 30] [--warmup 2] [--steps 4] [--batch-size 128]
"""
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import (add_out_argument, interleaved_step_times, machine_line, machine_meta,  # noqa: E402
                    print_step_table, step_summary, timing_method, timing_parser, write_record)

import fastmnist  # noqa: E402
from fastmnist import ops  # noqa: E402

BASE = "stock channels_last"


def wide_padded_net() -> nn.Module:
    """The padded 32/64-channel net (tests/test_fusion.py checks fuse on it as wide_padded)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.AvgPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(64),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )


def make_step(fused: bool, memory_format, device):
    torch.manual_seed(0)
    net = wide_padded_net().to(device, memory_format=memory_format).train()
    model = fastmnist.fuse(net) if fused else net
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        opt.step()

    return step


def parse_args():
    parser = timing_parser(__doc__)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.warmup < 0 or args.steps < 1 or args.batch_size < 2 or (args.rounds - args.warmup) * args.steps < 2:
        parser.error("need --warmup >= 0, --batch-size >= 2, and at least 2 timed steps per variant")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    if not ops.fused_supports(device.type):
        sys.exit(f"fuse_speed: {ops.fused_unavailable_reason(device.type)}")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch_size, 1, 28, 28, generator=gen).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)) for _ in range(args.steps)]
    variants = {"stock eager (NCHW)": (False, torch.contiguous_format), BASE: (False, torch.channels_last),
                "fused (fastmnist.fuse, channels_last)": (True, torch.channels_last)}
    steps = {name: make_step(fused, fmt, device) for name, (fused, fmt) in variants.items()}
    samples = interleaved_step_times(steps, batches, args.rounds, args.warmup, device)

    base = statistics.median(samples[BASE])
    rows = []
    for name, ts in samples.items():
        rows.append({"variant": name, **step_summary(ts),
                     "ratio_to_stock_channels_last": statistics.median(ts) / base, "samples": len(ts)})
    meta = {
        **machine_meta("fuse_speed", device),
        "fused_cpu_kernel_path": ops.cpu_kernel_path(),
        "network": "wide_padded: conv3x3(1->32,p1)-relu-bn, conv3x3(32->64,p1)-relu-bn, avgpool2, "
                   "conv3x3(64->64,p1)-relu-bn, conv3x3(64->64,p1,no bias)-relu-avgpool2, linear(3136->10)",
        "step": "SGD (lr 0.05, momentum 0.9), cross-entropy, random 28x28 images",
        "batch_size": args.batch_size, "rounds": args.rounds, "warmup_rounds": args.warmup,
        "steps_per_round": args.steps,
        "method": timing_method(args.warmup),
    }
    path = write_record(args.out, f"fuse_speed-{args.device}", {"meta": meta, "results": rows})

    print(f"\n{machine_line(meta)}, batch {args.batch_size}, "
          f"{len(samples[BASE])} timed steps per variant")
    print_step_table(rows, [(f"vs {BASE}", lambda r: f"{r['ratio_to_stock_channels_last']:.2f}x")])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
