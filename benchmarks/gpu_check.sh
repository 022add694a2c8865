#!/usr/bin/env bash
# The GPU check, one prepared command for a machine with a CUDA GPU, torch and
# nvcc but no internet (MNIST must travel with the tree: the ignored data/
# folder, or $FASTMNIST_DATA). In under 8 minutes it
#   1. builds fastmnist._C with the CUDA kernels (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise),
#   2. runs the CUDA tests (fused CUDA vs stock CUDA, fused CUDA vs fused CPU),
#   3. times training steps of stock eager, channels_last, torch.compile and fused on the GPU,
#   4. trains the default model to completion and reports the time to 99.4%,
# and prints a short table last. Raw output goes to $OUT when set, else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export FASTMNIST_DATA=${FASTMNIST_DATA:-$PWD/data}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
start=$SECONDS
stage() { echo; echo "== $1 ($((SECONDS - start)) s)"; }

stage "build"
FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$out/gpu_build.log" 2>&1 \
  || { tail -60 "$out/gpu_build.log"; echo "gpu_check: build failed"; exit 1; }
grep "fastmnist build:" "$out/gpu_build.log"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

stage "CUDA tests"
python3 -m pytest tests/test_ops.py tests/test_layers.py tests/test_model.py -q -rs 2>&1 | tee "$out/gpu_tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

stage "epoch timing"
python3 benchmarks/epoch_time.py --device cuda --rounds 12 --steps 20 --out "$out" 2>&1 | tee "$out/gpu_epoch_time.log" | tail -9

stage "default training on the GPU"
rm -rf "$out/gpu_train"
python3 -m fastmnist.cli train --device cuda --out "$out/gpu_train" --no-progress 2>&1 | tee "$out/gpu_train.log"

stage "summary"
python3 - "$out" "$tests_rc" <<'PY'
import glob, json, os, sys
out, tests_rc = sys.argv[1], int(sys.argv[2])
m = json.load(open(os.path.join(out, "gpu_train", "metrics.json")))
elapsed, hit = 0.0, None
for r in m["epochs"]:
    elapsed += r["epoch_seconds"]
    if hit is None and r["test_acc"] >= 0.994:
        hit = (r["epoch"], elapsed)
bench = json.load(open(sorted(glob.glob(os.path.join(out, "epoch_time-cuda-*.json")))[-1]))
summary = {"device": m["device_name"], "torch": m["torch_version"], "tests_exit_code": tests_rc,
           "final_test_acc": m["final_test_acc"], "train_seconds": m["total_train_seconds"],
           "first_epoch_at_99_4": hit[0] if hit else None, "seconds_to_99_4": hit[1] if hit else None,
           "epoch_time": bench["results"]}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"{m['device_name']}, torch {m['torch_version']}, CUDA tests exit code {tests_rc}")
print("| variant | median step (ms) | epoch (s) | vs stock eager |")
print("|---|---|---|---|")
for r in bench["results"]:
    print(f"| {r['variant']} | {r['median_step_ms']:.2f} | {r['epoch_seconds']:.2f} | {r['ratio_to_stock_eager']:.2f}x |")
print(f"default training: final test accuracy {100 * m['final_test_acc']:.2f}% after {len(m['epochs'])} epochs, "
      f"{m['total_train_seconds']:.1f} s of training; 99.4% first reached "
      + (f"after epoch {hit[0]} at {hit[1]:.1f} s" if hit else "never"))
PY
echo "gpu_check: done in $((SECONDS - start)) s"
