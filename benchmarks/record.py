"""What every benchmark under benchmarks/ shares: the step timer, the interleaved timing loop, the record's
machine metadata (commit, CPU model, threads, capability) and where the JSON record is written.

One home for each, so that two benchmarks never time or describe the machine in two ways; the scripts run
as `python benchmarks/X.py` (benchmarks/ is then sys.path[0]) and import this module as `record`.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fastmnist.device import cpu_model

REPO = Path(__file__).resolve().parent.parent


def timing_parser(description):
    """The options of an interleaved step timing (interleaved_step_times); the script adds its own and --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first rounds left out of the figures")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--batch-size", type=int, default=128)
    return parser


def add_out_argument(parser):
    """--out: where write_record puts the JSON (benchmarks/results/ unless $OUT or --out says otherwise)."""
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))


def git_commit():
    """The commit measured, with '-dirty' when the working tree differs from it; None outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


class StepTimer:
    """Wall time of one step: CUDA events on the GPU (no host clock without sync), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def interleaved_step_times(steps, batches, rounds, warmup, device):
    """{name: per-step seconds} of each step(x, y) in `steps` over `batches`, the first `warmup` rounds left out.

    Each round runs every variant once on the same batches: drift in machine speed hits every variant alike.
    """
    timer, samples = StepTimer(device), {name: [] for name in steps}
    for rnd in range(rounds):
        for name, step in steps.items():
            times = [timer(lambda: step(x, y)) for x, y in batches]
            if rnd >= warmup:
                samples[name] += times
    return samples


def timing_method(warmup):
    """The record's `method`: how interleaved_step_times and StepTimer measured."""
    return ("median of per-step times, variants interleaved round by round on the same batches; "
            f"{warmup} warm-up rounds excluded; CUDA events on the GPU")


def step_summary(times):
    """The median step time and its interquartile range, in milliseconds, as the records name them."""
    q = statistics.quantiles(times, n=4)
    return {"median_step_ms": 1e3 * statistics.median(times), "iqr_ms": [1e3 * q[0], 1e3 * q[2]]}


def machine_meta(benchmark, device):
    """The head of a timing record's meta: what was measured, when, at which commit, on which machine."""
    return {
        "benchmark": benchmark, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(), "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_line(meta):
    """The first words of a timing report: the machine, its threads and capability, torch and the commit."""
    return (f"{meta['device_name']} ({meta['device']}, {meta['torch_threads']} threads, {meta['cpu_capability']}), "
            f"torch {meta['torch']}, commit {meta['git_commit']}")


def print_step_table(rows, columns):
    """Markdown table of step_summary rows: variant, median, IQR, then each (header, row -> text) of columns."""
    print("| variant | median step (ms) | IQR (ms) | " + " | ".join(h for h, _ in columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_step_ms']:.1f} | {r['iqr_ms'][0]:.1f}-{r['iqr_ms'][1]:.1f} | "
              + " | ".join(cell(r) for _, cell in columns) + " |")


def write_record(out, stem, result) -> Path:
    """Writes `result` as OUT/STEM-<local time>.json and returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
