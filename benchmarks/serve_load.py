"""Load on loopback for `fastmnist serve`: a bounded number of POST /api/predict requests of a drawn digit,
at concurrency 1 and 16, against the server started as a user starts it (a subprocess of `fastmnist serve`).

Every answer must be 200. Reports per concurrency the median (p50) and p99 latency seen by the client,
requests per second, and the server's resident memory (VmRSS, Linux) before and after, sampled during the
run too; writes JSON under benchmarks/results/ (or $OUT) with the git commit, CPU model and threads, and
checks the targets of issue 21: p99 <= 30 ms at concurrency 1, >= 300 requests/s at 16, memory growth
under 50 MB, every request answered 200.

    python benchmarks/serve_load.py [RUN_OR_MODEL] [--requests 2000] [--concurrency 1 16] [--warmup 50]

RUN_OR_MODEL is what `fastmnist serve` takes (default: the newest finished run under runs/). The client is
Python threads on the same machine, one keep-alive connection each (as a browser keeps one), so its own CPU
time counts against the server's: the figures are a floor. Run it on a quiet machine.
"""
import argparse
import datetime
import http.client
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_out_argument, git_commit, write_record  # noqa: E402

from fastmnist.data import load_mnist  # noqa: E402
from fastmnist.device import cpu_model  # noqa: E402

TARGETS = {"p99_ms_at_1": 30.0, "requests_per_second_at_16": 300.0, "rss_growth_mb": 50.0}


def drawn_digit_png(data_dir=None) -> bytes:
    """What the page sends: a 280x280 PNG of a white digit on black (MNIST's first test digit, scaled 10x)."""
    digit = load_mnist(data_dir, log=lambda *_: None).test_images[0]
    image = Image.fromarray(digit.numpy(), "L").resize((280, 280), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def start_server(model):
    """`fastmnist serve MODEL --port 0` in a subprocess: (process, port)."""
    args = [sys.executable, "-m", "fastmnist.cli", "serve", *([model] if model else []), "--port", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if match:
            print(line.strip())
            return proc, int(match.group(1))
    sys.exit(f"serve_load: fastmnist serve exited ({proc.wait()}) without serving")


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def load(port, body, requests, concurrency):
    """(latencies in seconds, statuses, wall seconds) of `requests` POSTs spread over `concurrency` threads."""
    latencies, statuses, lock = [], [], threading.Lock()
    counts = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    start_gate = threading.Barrier(concurrency + 1)

    def client(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        start_gate.wait()
        for _ in range(count):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/predict", body, {"Content-Type": "image/png"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                status = None
            mine.append((time.perf_counter() - t0, status))
        conn.close()
        with lock:
            latencies.extend(t for t, _ in mine)
            statuses.extend(s for _, s in mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, statuses, time.perf_counter() - t0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a run folder or model.pt (default: the newest finished run)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--warmup", type=int, default=50, help="requests before each level, not timed")
    parser.add_argument("--data-dir", help="MNIST folder (for the drawn digit)")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.requests < 2 or args.warmup < 0 or min(args.concurrency) < 1:
        parser.error("--requests must be >= 2, --warmup >= 0, each --concurrency >= 1")
    return args


def main():
    args = parse_args()
    body = drawn_digit_png(args.data_dir)
    proc, port = start_server(args.model)
    rows, samples, stop = [], [], threading.Event()
    try:
        def sample():  # the server's memory through the run, every 100 ms
            while not stop.wait(0.1):
                samples.append(rss_mb(proc.pid))

        load(port, body, max(args.warmup, 1), 1)  # the first requests load code and caches
        rss_start = rss_mb(proc.pid)
        threading.Thread(target=sample, daemon=True).start()
        for c in args.concurrency:
            load(port, body, args.warmup, c)
            before = rss_mb(proc.pid)
            latencies, statuses, seconds = load(port, body, args.requests, c)
            after = rss_mb(proc.pid)
            ms = sorted(1e3 * t for t in latencies)
            rows.append({
                "concurrency": c, "requests": len(statuses), "answered_200": statuses.count(200),
                "other_statuses": sorted({str(s) for s in statuses if s != 200}),
                "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)],
                "max_ms": ms[-1], "requests_per_second": len(statuses) / seconds, "seconds": seconds,
                "rss_mb_before": before, "rss_mb_after": after,
            })
            print(f"concurrency {c:2d}: {rows[-1]['answered_200']}/{len(statuses)} answered 200, "
                  f"p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms, "
                  f"{rows[-1]['requests_per_second']:.0f} requests/s, RSS {before:.1f} -> {after:.1f} MB")
        stop.set()
        rss_end = rss_mb(proc.pid)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)

    by_c = {r["concurrency"]: r for r in rows}
    checks = {
        "every request answered 200": all(r["answered_200"] == r["requests"] for r in rows),
        f"rss growth < {TARGETS['rss_growth_mb']:g} MB": rss_end - rss_start < TARGETS["rss_growth_mb"],
    }
    if 1 in by_c:
        checks[f"p99 <= {TARGETS['p99_ms_at_1']:g} ms at concurrency 1"] = by_c[1]["p99_ms"] <= TARGETS["p99_ms_at_1"]
    if 16 in by_c:
        checks[f">= {TARGETS['requests_per_second_at_16']:g} requests/s at concurrency 16"] = (
            by_c[16]["requests_per_second"] >= TARGETS["requests_per_second_at_16"])
    meta = {
        "benchmark": "serve_load", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(), "cpu_model": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)), "server_torch_threads": 1,
        "server_worker_threads": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "body_bytes": len(body), "requests_per_level": args.requests, "warmup_per_level": args.warmup,
        "rss_mb_start": rss_start, "rss_mb_end": rss_end, "rss_mb_max": max(samples, default=rss_end),
        "rss_growth_mb": rss_end - rss_start,
        "method": "client: Python threads on the same machine, one keep-alive connection each; latency from "
                  "sending the request to reading the whole answer; p99 is the 99th percentile of the sorted "
                  "latencies; the server's VmRSS after a warm-up, then sampled every 100 ms",
    }
    path = write_record(args.out, "serve_load", {"meta": meta, "results": rows, "checks": checks})
    print(f"RSS {rss_start:.1f} MB after warm-up, {rss_end:.1f} MB at the end (max {meta['rss_mb_max']:.1f})")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    print(f"wrote {path}")
    return 0 if checks["every request answered 200"] else 1


if __name__ == "__main__":
    sys.exit(main())
