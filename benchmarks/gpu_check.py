"""The Python half of benchmarks/gpu_check.sh (read that file first).

    python3 benchmarks/gpu_check.py prepare [--dest data]   # here: gzipped MNIST into an ignored folder
    python3 benchmarks/gpu_check.py preflight               # there: CUDA visible, MNIST present
    python3 benchmarks/gpu_check.py fused-built             # there: the build has CUDA kernels
    python3 benchmarks/gpu_check.py require-cuda-kernels S  # there: stage S refuses to run without them
    python3 benchmarks/gpu_check.py small-shapes            # there: run under compute-sanitizer
    python3 benchmarks/gpu_check.py bench --json F          # there: step timing, TF32 off
    python3 benchmarks/gpu_check.py train-report RUN SECS   # there: fails below 99% test accuracy
    python3 benchmarks/gpu_check.py explain STAGE LOG       # there: one line a reader can fix from
    python3 benchmarks/gpu_check.py summary OUT             # there: table + one line per stage + verdict

Each subcommand exits non-zero when its stage fails, with one line saying why. Every subcommand that
runs on the GPU imports fastmnist and requires its CUDA kernels first (require_cuda_kernels): without
that import torch.ops.fastmnist has no ops at all, and a stage would fail for a reason unrelated to the
kernels.
"""
import argparse
import gzip
import json
import math
import os
import re
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


CUDA_OPS = ("conv_relu_bn", "conv_relu_bn_backward", "conv_path")  # conv_relu_pool has CPU kernels only


def require_cuda_kernels(stage):
    """Import the package (its import registers torch.ops.fastmnist) and exit, naming the stage and the
    reason, unless CUDA is visible and the build has a CUDA kernel for every op in CUDA_OPS."""
    import torch

    from fastmnist import ops

    if not torch.cuda.is_available():
        sys.exit(f"{stage}: CUDA is not visible to torch (torch.cuda.is_available() is False); nothing to check")
    missing = [op for op in CUDA_OPS if not ops.fused_supports("cuda", op)]
    if missing:
        sys.exit(f"{stage}: no CUDA kernel for fastmnist::{', '.join(missing)}: {ops.fused_unavailable_reason('cuda')}")
    return ops


def cmd_require_cuda_kernels(args):
    require_cuda_kernels(args.stage)
    print(f"{args.stage}: fastmnist imported with CUDA kernels for {', '.join(CUDA_OPS)}")


def cmd_fused_built(args):
    require_cuda_kernels("fused-built")
    print(f"fused-built: fastmnist._C has CUDA kernels for {', '.join(CUDA_OPS)}")


# compute-sanitizer's shapes: two channel tiles of the output (Cout 72 > 64 channels a block) and of
# the input gradient (Cin 72), partial thread tiles (Cout 40, 7), rectangular kernels with per-dimension
# padding, padding as wide as the kernel, channel_scale, eval, float64.
SMALL_SHAPES = [  # (N, Cin, H, W, Cout, KH, KW, (pad_h, pad_w), training, scale, dtype)
    (3, 5, 9, 7, 72, 3, 3, (1, 1), True, True, "float32"),
    (2, 72, 6, 6, 8, 3, 3, (1, 1), True, False, "float32"),
    (3, 5, 9, 7, 40, 3, 2, (1, 1), True, True, "float32"),
    (2, 16, 14, 13, 24, 3, 5, (1, 2), True, True, "float32"),
    (2, 24, 6, 6, 24, 3, 3, (0, 0), False, False, "float32"),
    (2, 3, 5, 8, 7, 2, 4, (2, 2), True, False, "float64"),
]


def cmd_small_shapes(args):
    """Each case's fused forward+backward on CUDA, compared with the stock layers in float64 on the CPU:
    under compute-sanitizer a wrong result names its case and error, not only a bad access."""
    import torch

    ops = require_cuda_kernels("small-shapes")
    tf32_off()
    torch.manual_seed(0)
    failures = []
    for i, (n, cin, h, w, cout, kh, kw, pad, training, scale, dtype) in enumerate(SMALL_SHAPES):
        dt = getattr(torch, dtype)
        ref_args = [torch.randn(n, cin, h, w, dtype=torch.float64), torch.randn(cout, cin, kh, kw, dtype=torch.float64) * 0.3,
                    torch.randn(cout, dtype=torch.float64), torch.rand(cout, dtype=torch.float64) + 0.5,
                    torch.randn(cout, dtype=torch.float64)]
        rm, rv = torch.randn(cout, dtype=torch.float64), torch.rand(cout, dtype=torch.float64) + 0.5
        s = torch.rand(n, cout, dtype=torch.float64) if scale else None
        x, wt, b, g, beta = (t.to("cuda", dt) for t in ref_args)
        x = x.contiguous(memory_format=torch.channels_last)
        sc = s.to("cuda", dt) if scale else None
        y, r, mean, var = torch.ops.fastmnist.conv_relu_bn(x, wt, b, g, beta, rm.to("cuda", dt), rv.to("cuda", dt),
                                                           training, 1e-5, list(pad), sc)
        gy = torch.randn(y.shape, dtype=torch.float64)
        grads = torch.ops.fastmnist.conv_relu_bn_backward(gy.to("cuda", dt), x, wt, r, g, mean, var, training, 1e-5,
                                                          list(pad), True, sc)
        torch.cuda.synchronize()
        leaves = [t.clone().requires_grad_() for t in ref_args]
        ref_y = ops.reference_conv_relu_bn(*leaves, rm.clone(), rv.clone(), training, 0.1, 1e-5, pad, s)
        ref = [ref_y, *torch.autograd.grad(ref_y, leaves, gy)]
        worst = 0.0
        for name, got, want in zip(["y", "grad_x", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias"],
                                   [y, *grads], ref):
            err = ((got.cpu().double() - want).abs().max() / (1 + want.abs().max())).item()
            worst = max(worst, err)
            if not err <= (1e-4 if dtype == "float32" else 1e-10):  # `not <=`: a NaN error fails too
                failures.append(f"case {i} {SMALL_SHAPES[i]}: {name} error {err:.3g} (relative to its largest entry)")
        print(f"small-shapes: case {i} {SMALL_SHAPES[i]}: worst relative error {worst:.2g}")
    if failures:
        sys.exit(f"small-shapes: {len(failures)} wrong output(s); first: {failures[0]}")
    print(f"small-shapes: {len(SMALL_SHAPES)} cases ran and match the float64 CPU reference")


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

    require_cuda_kernels("bench")
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
    samples, thr = {}, {}
    meta = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_size": args.batch_size,
            "tf32": False, "rounds_timed": 0, "steps_per_round": args.steps,
            "throughput_steps": args.throughput_steps,
            "method": "CUDA events; per-step: median of event-timed steps each synchronised; throughput: "
                      "median over rounds of (N steps back to back, one sync) / N; real MNIST batches"}

    def write_json(complete):
        """bench.json as far as the bench got: a timeout keeps every variant timed so far."""
        rows = bench_rows(specs, steps, errors, first_call, samples, thr, args.batch_size)
        Path(args.json).write_text(json.dumps({"meta": {**meta, "complete": complete}, "results": rows}, indent=2))
        return rows

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
        write_json(complete=False)

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

    samples.update({name: [] for name in steps})
    thr.update({name: [] for name in steps})
    for rnd in range(args.rounds):  # interleaved: drift hits every variant alike
        for name, step in steps.items():
            t = per_step(step)
            m = throughput(step, args.throughput_steps)
            if rnd >= 1:
                samples[name] += t
                thr[name].append(m)
                meta["rounds_timed"] = rnd
                write_json(complete=False)  # after each variant's timing: a timeout loses at most one
    rows = write_json(complete=True)
    print(bench_table(rows))
    if errors:
        sys.exit(f"bench: {len(errors)} variant(s) failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


def bench_rows(specs, steps, errors, first_call, samples, thr, batch_size):
    """One row per variant: its timings so far, its error, or that it was not timed yet."""
    rows = []
    eager = "stock eager (NCHW)"
    base = statistics.median(samples[eager]) if samples.get(eager) else None
    for name in specs:
        if name in errors:
            rows.append({"variant": name, "error": errors[name]})
        elif not samples.get(name):
            rows.append({"variant": name, "error": "not timed (the bench stopped before it)"})
        else:
            med = statistics.median(samples[name])
            rows.append({"variant": name, "median_step_ms": med, "throughput_ms_per_step": statistics.median(thr[name]),
                         "epoch_seconds_at_throughput": statistics.median(thr[name]) * math.ceil(60000 / batch_size) / 1e3,
                         "ratio_to_stock_eager": med / base if base else None, "first_call_seconds": first_call[name],
                         "samples": len(samples[name])})
    return rows


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
    stages, statuses = [], []
    try:
        for line in (out / "stages.tsv").read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            stages.append(f"{status:<8} {name} ({seconds} s){': ' + note if note else ''}")
            statuses.append(status)
    except Exception as exc:
        stages.append(f"FAIL     stages.tsv unreadable: {exc}")
        statuses.append("FAIL")
    print("\n".join(stages))
    print(f"gpu_check: {verdict(statuses)}")


EXPECTED_STAGES = 7  # preflight build tests bench train memcheck racecheck


def verdict(statuses):
    """FAIL if any stage failed or is missing; REFUSED if the rest passed but a sanitizer was refused by
    the runtime (the kernels' memory safety is then unchecked: its own word, never PASS); else PASS."""
    if "FAIL" in statuses or len(statuses) < EXPECTED_STAGES or set(statuses) - {"PASS", "REFUSED"}:
        return "FAIL"
    if "REFUSED" in statuses:
        return "REFUSED (every stage that ran passed; compute-sanitizer could not attach, so memory safety is unchecked)"
    return "PASS"


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
    impl = m.get("model_kwargs", {}).get("impl", "?")
    print(f"gpu_check train: {m.get('device_name')}, impl {impl}, final test accuracy "
          f"{100 * m['final_test_acc']:.2f}% after {len(m['epochs'])} epochs, {m['total_train_seconds']:.1f} s of "
          f"training (wall time to the final model: {args.wall} s); 99.4% first "
          + (f"after epoch {hit[0]} at {hit[1]:.1f} s" if hit else "never reached"))
    if impl != "fused":
        sys.exit(f"train: the run used impl {impl!r}, not the fused CUDA kernels")
    if not m["final_test_acc"] >= MIN_TRAIN_ACCURACY:
        sys.exit(f"train: final test accuracy {100 * m['final_test_acc']:.2f}% is below "
                 f"{100 * MIN_TRAIN_ACCURACY:.0f}% (per epoch: "
                 + ", ".join(f"{100 * r['test_acc']:.2f}%" for r in m["epochs"]) + ")")


MIN_TRAIN_ACCURACY = 0.99  # every recorded CPU run of the default recipe ends above 99.4%


def cmd_explain(args):
    """One line from a failed stage's output that a reader can act on without rerunning it."""
    text = Path(args.log).read_text(errors="replace") if Path(args.log).exists() else ""
    print(explain(args.stage, text))


def explain(stage, text):
    lines = [l.rstrip() for l in text.splitlines() if l.strip()]
    own = [l for l in lines if re.match(rf"({re.escape(stage)}|small-shapes|fused-built|preflight|bench|train)\b.*:", l)]
    if stage == "build":
        err = [l for l in lines if re.search(r"\berror\b|Error:", l) and "warning" not in l]
        if err and "interrupted by user" not in err[0]:
            return "first compiler/build error: " + err[0].strip()[:300]
        steps = [l for l in lines if re.match(r"\[\d+/\d+\]", l)]
        if steps:  # stopped while compiling (ninja prints a step when it finishes): how far it got
            done, total = steps[-1].split()[0].strip("[]").split("/")
            src = re.search(r"-c (\S+\.(?:cpp|cu))", steps[-1])
            return (f"{done} of {total} build steps finished, the last {src.group(1) if src else steps[-1][:120]}"
                    " (raise the build's limit in gpu_check.sh, or MAX_JOBS)")
        config = next((l for l in lines if l.startswith("fastmnist build:")), None)
        if config:  # setup.py ran, but no compile step finished
            n = config.count(".cpp'") + config.count(".cu'")
            return (f"none of the {n} sources finished compiling within the limit ({config.split('|')[0].split(':')[1].strip()}, "
                    f"MAX_JOBS={os.environ.get('MAX_JOBS', '?')}); raise the build's limit in gpu_check.sh")
    if stage == "tests":
        failed = [l for l in lines if l.startswith(("FAILED ", "ERROR "))]
        diff = [l.strip().lstrip("E").strip() for l in lines if not l.startswith(("FAILED ", "ERROR "))
                and ("Greatest" in l or "fused error" in l)]
        if failed:
            more = f" (+{len(failed) - 2} more)" if len(failed) > 2 else ""
            return " | ".join(f[:200] for f in failed[:2]) + more + (f" | first difference: {diff[0][:160]}" if diff else "")
        if diff:
            return diff[0][:300]
    if stage in ("memcheck", "racecheck"):
        first = next((i for i, l in enumerate(lines) if re.match(r"=+ (Invalid|Error|Race|Warning|Program hit)", l)), None)
        if first is not None:
            head = lines[first].strip("= ")
            if re.search(r"\.(cu|cuh|h|cpp):\d+", head):
                return f"first report: {head[:360]}"
            where = next((l for l in lines[first + 1:first + 6] if re.search(r"\.(cu|cuh|h|cpp):\d+", l)), "")
            return f"first report: {head[:160]}" + (f" | {where.strip('= ')[:200]}" if where
                                                    else " | no source line (build without -lineinfo?)")
    if own:
        return own[-1][:300]
    return (lines[-1][:300] if lines else "no output")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--dest", default=str(REPO / "data"))
    sub.add_parser("preflight")
    sub.add_parser("fused-built")
    s = sub.add_parser("require-cuda-kernels")
    s.add_argument("stage")
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
    s = sub.add_parser("explain")
    s.add_argument("stage")
    s.add_argument("log")
    s = sub.add_parser("summary")
    s.add_argument("out")
    args = p.parse_args()
    {"prepare": cmd_prepare, "preflight": cmd_preflight, "fused-built": cmd_fused_built,
     "require-cuda-kernels": cmd_require_cuda_kernels, "small-shapes": cmd_small_shapes, "bench": cmd_bench,
     "train-report": cmd_train_report, "explain": cmd_explain, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
