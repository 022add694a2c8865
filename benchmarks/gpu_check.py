"""The Python half of benchmarks/gpu_check.sh (read that file first).

    python3 benchmarks/gpu_check.py prepare [--dest data]   # here: gzipped MNIST into an ignored folder
    python3 benchmarks/gpu_check.py preflight               # there: CUDA visible, MNIST present
    python3 benchmarks/gpu_check.py fused-built             # there: the build has CUDA kernels
    python3 benchmarks/gpu_check.py small-shapes            # there: run under compute-sanitizer
    python3 benchmarks/gpu_check.py bench --json F          # there: step timing, TF32 off
    python3 benchmarks/gpu_check.py summary OUT             # there: table + one PASS/FAIL line per stage

Each subcommand exits non-zero when its stage fails, with one line saying why.
"""
import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def tf32_off():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def cmd_prepare(args):
    """Gzip the four MNIST files found here (any search location) into args.dest (ignored by git: carry it)."""
    from fastmnist.data import FILES, candidate_dirs, locate_files

    for d in candidate_dirs(None):
        files = locate_files(d)
        if files:
            break
    else:
        sys.exit("prepare: no MNIST here; run `python -m fastmnist.cli train --limit-train 2 --epochs 1` once to fetch it")
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        src, out = Path(files[name]), dest / f"{name}.gz"
        if src.suffix == ".gz":
            shutil.copyfile(src, out)
        else:
            with open(src, "rb") as f, gzip.open(out, "wb", compresslevel=9) as g:
                shutil.copyfileobj(f, g)
    assert locate_files(dest), "prepare: the gzipped copy is incomplete"
    print(f"prepare: MNIST gzipped into {dest} ({sum(p.stat().st_size for p in dest.glob('*.gz')) >> 20} MiB)")


def cmd_preflight(args):
    import torch

    from fastmnist.data import load_mnist

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        sys.exit("preflight: CUDA is not visible to torch (torch.cuda.is_available() is False)")
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB")
    mnist = load_mnist(os.environ.get("FASTMNIST_DATA"), log=lambda *_: None)  # raises with the remedy
    print(f"MNIST: {len(mnist.train_labels)} train, {len(mnist.test_labels)} test images")


def cmd_fused_built(args):
    from fastmnist import ops

    for op in ("conv_relu_bn", "conv_relu_bn_backward"):
        if not ops.fused_supports("cuda", op):
            sys.exit(f"fused-built: no CUDA kernel for fastmnist::{op}: {ops.fused_unavailable_reason('cuda')}")
    print("fused-built: fastmnist._C has CUDA kernels for conv_relu_bn and conv_relu_bn_backward")


def cmd_small_shapes(args):
    """A few small fused forward+backward calls for compute-sanitizer: two channel tiles (Cout 40),
    kh != kw with padding, channel_scale, eval, float64, 24 channels."""
    import torch

    torch.manual_seed(0)
    cases = [  # (N, Cin, H, W, Cout, KH, KW, pad, training, scale, dtype)
        (3, 5, 9, 7, 40, 3, 2, 1, True, True, torch.float32),
        (2, 24, 6, 6, 24, 3, 3, 0, False, False, torch.float32),
        (2, 3, 5, 8, 7, 2, 4, 2, True, False, torch.float64),
    ]
    for n, cin, h, w, cout, kh, kw, pad, training, scale, dtype in cases:
        dev = dict(device="cuda", dtype=dtype)
        x = torch.randn(n, cin, h, w, **dev).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(cout, cin, kh, kw, **dev) * 0.3
        b, g, beta = torch.randn(cout, **dev), torch.rand(cout, **dev) + 0.5, torch.randn(cout, **dev)
        rm, rv = torch.randn(cout, **dev), torch.rand(cout, **dev) + 0.5
        s = torch.rand(n, cout, **dev) if scale else None
        y, r, mean, var = torch.ops.fastmnist.conv_relu_bn(x, wt, b, g, beta, rm, rv, training, 1e-5, pad, s)
        grads = torch.ops.fastmnist.conv_relu_bn_backward(torch.randn_like(y), x, wt, r, g, mean, var, training,
                                                          1e-5, pad, True, s)
        torch.cuda.synchronize()
        for t in (y, *grads):
            assert torch.isfinite(t).all(), "small-shapes: a non-finite output"
    print(f"small-shapes: {len(cases)} cases ran")


def _graph_step(step, batches):
    """The whole training step captured in one CUDA graph on static input buffers."""
    import torch

    sx, sy = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as the CUDA-graph docs ask
        for _ in range(3):
            step(sx, sy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(sx, sy)

    def replay(x, y):
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        graph.replay()

    return replay


def cmd_bench(args):
    import torch

    from epoch_time import make_batches, make_variant

    tf32_off()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    batches = make_batches(args.steps, args.batch_size, dev, None, False)
    cl = torch.channels_last
    specs = {
        "stock eager (NCHW)": lambda: make_variant("stock", torch.contiguous_format, False, dev),
        "stock channels_last": lambda: make_variant("stock", cl, False, dev),
        "torch.compile (stock, channels_last)": lambda: make_variant("stock", cl, True, dev),
        "fused": lambda: make_variant("fused", cl, False, dev),
        "fused in a CUDA graph": lambda: _graph_step(make_variant("fused", cl, False, dev), batches),
    }
    steps, errors, first_call = {}, {}, {}
    for name, make in specs.items():
        try:
            t0 = time.perf_counter()
            step = make()
            step(*batches[0])  # first call: compiles where compiled
            torch.cuda.synchronize()
            first_call[name] = time.perf_counter() - t0
            steps[name] = step
        except Exception as exc:  # recorded and reported: a missing variant is a failed stage
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"bench: variant {name!r} failed: {errors[name]}")

    def per_step(step):  # one event pair per step, synchronised per step: latency
        times = []
        for x, y in batches:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(x, y)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return times

    def throughput(step, n):  # n steps back to back, one sync: what training sees
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(n):
            step(*batches[i % len(batches)])
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / n

    samples = {name: [] for name in steps}
    thr = {name: [] for name in steps}
    for rnd in range(args.rounds):  # interleaved: drift hits every variant alike
        for name, step in steps.items():
            t = per_step(step)
            m = throughput(step, args.throughput_steps)
            if rnd >= 1:
                samples[name] += t
                thr[name].append(m)
    rows = []
    base = statistics.median(samples["stock eager (NCHW)"]) if "stock eager (NCHW)" in samples else None
    for name in specs:
        if name not in steps:
            rows.append({"variant": name, "error": errors[name]})
            continue
        med = statistics.median(samples[name])
        rows.append({"variant": name, "median_step_ms": med, "throughput_ms_per_step": statistics.median(thr[name]),
                     "epoch_seconds_at_throughput": statistics.median(thr[name]) * math.ceil(60000 / args.batch_size) / 1e3,
                     "ratio_to_stock_eager": med / base if base else None, "first_call_seconds": first_call[name],
                     "samples": len(samples[name])})
    meta = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_size": args.batch_size,
            "tf32": False, "rounds_timed": args.rounds - 1, "steps_per_round": args.steps,
            "throughput_steps": args.throughput_steps,
            "method": "CUDA events; per-step: median of event-timed steps each synchronised; throughput: "
                      "median over rounds of (N steps back to back, one sync) / N; real MNIST batches"}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(bench_table(rows))
    if errors:
        sys.exit(f"bench: {len(errors)} variant(s) failed: {', '.join(errors)}")


def bench_table(rows):
    lines = ["| variant | per-step median (ms) | throughput (ms/step) | epoch at throughput (s) | vs stock eager |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | FAILED: {r['error'][:80]} | | | |")
        else:
            ratio = f"{r['ratio_to_stock_eager']:.2f}x" if r["ratio_to_stock_eager"] else "?"
            lines.append(f"| {r['variant']} | {r['median_step_ms']:.2f} | {r['throughput_ms_per_step']:.2f} | "
                         f"{r['epoch_seconds_at_throughput']:.1f} | {ratio} |")
    return "\n".join(lines)


def cmd_summary(args):
    """Survives any missing piece: every read is guarded; the PASS/FAIL lines come last."""
    out = Path(args.out)
    for title, fn in (("step timing", _summary_bench), ("default training", _summary_train)):
        try:
            print(f"-- {title}")
            print(fn(out))
        except Exception as exc:
            print(f"(no {title} result: {type(exc).__name__}: {exc})")
    print("-- verdict per stage")
    stages, verdict = [], "PASS"
    try:
        for line in (out / "stages.tsv").read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            stages.append(f"{status:<8} {name} ({seconds} s){': ' + note if note else ''}")
            if status == "FAIL":
                verdict = "FAIL"
    except Exception as exc:
        stages.append(f"FAIL     stages.tsv unreadable: {exc}")
        verdict = "FAIL"
    print("\n".join(stages))
    print(f"gpu_check: {verdict}")


def _summary_bench(out):
    data = json.loads((out / "bench.json").read_text())
    m = data["meta"]
    return f"{m['device_name']}, torch {m['torch']}, batch {m['batch_size']}, TF32 off\n" + bench_table(data["results"])


def _summary_train(out):
    text = (out / "train.log").read_text()
    lines = [l for l in text.splitlines() if l.startswith("gpu_check train:") or "final test accuracy" in l]
    return "\n".join(lines) if lines else "no final accuracy line in train.log"


def cmd_train_report(args):
    """Time to the final model and per-epoch accuracy, from the run folder's metrics.json."""
    m = json.loads((Path(args.run) / "metrics.json").read_text())
    elapsed, hit = 0.0, None
    for r in m["epochs"]:
        elapsed += r["epoch_seconds"]
        if hit is None and r["test_acc"] >= 0.994:
            hit = (r["epoch"], elapsed)
    print(f"gpu_check train: {m.get('device_name')}, impl {m.get('model_kwargs', {}).get('impl', '?')}, final test accuracy "
          f"{100 * m['final_test_acc']:.2f}% after {len(m['epochs'])} epochs, {m['total_train_seconds']:.1f} s of "
          f"training (wall time to the final model: {args.wall} s); 99.4% first "
          + (f"after epoch {hit[0]} at {hit[1]:.1f} s" if hit else "never reached"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--dest", default=str(REPO / "data"))
    sub.add_parser("preflight")
    sub.add_parser("fused-built")
    sub.add_parser("small-shapes")
    s = sub.add_parser("bench")
    s.add_argument("--json", required=True)
    s.add_argument("--rounds", type=int, default=6, help="interleaved rounds; the first is warm-up")
    s.add_argument("--steps", type=int, default=20, help="event-timed steps per variant per round")
    s.add_argument("--throughput-steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=128)
    s = sub.add_parser("train-report")
    s.add_argument("run")
    s.add_argument("wall")
    s = sub.add_parser("summary")
    s.add_argument("out")
    args = p.parse_args()
    {"prepare": cmd_prepare, "preflight": cmd_preflight, "fused-built": cmd_fused_built,
     "small-shapes": cmd_small_shapes, "bench": cmd_bench, "train-report": cmd_train_report,
     "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
