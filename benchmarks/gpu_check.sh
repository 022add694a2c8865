#!/usr/bin/env bash
# The GPU check: one call on a machine with a CUDA GPU, torch and nvcc but no
# network, one trustworthy verdict, at most ~8 minutes (every stage under
# `timeout`, each stage's limit cut to what is left of the total).
#
# Prepare here, once (MNIST must travel: data/ is gitignored, so carry it):
#   python3 benchmarks/gpu_check.py prepare          # gzipped MNIST into data/ (~11 MiB)
# Then the device call (run tool):
#   command: PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh
#   carry:   ["data"]        timeout_s: 560
# The run tool sends the checkout the session started in: run it from that
# checkout (with this branch merged), or copy data/ there.
#
# Stages (each writes one line to $OUT/stages.tsv: name, PASS|FAIL|REFUSED, seconds, note):
#   preflight   CUDA visible to torch, nvcc version, MNIST present
#   build       pip install -v (TORCH_CUDA_ARCH_LIST=9.0), then fail unless ops.fused_supports("cuda")
#   tests       the CUDA tests alone (-m needs_cuda), each with a timeout; any skip is a failure
#   memcheck    compute-sanitizer --tool memcheck on small shapes (REFUSED when the runtime refuses the device)
#   racecheck   compute-sanitizer --tool racecheck, same shapes
#   bench       step timing, TF32 off: stock eager, channels_last, torch.compile, fused, fused in a CUDA graph;
#               CUDA events, per-step and throughput (N steps, one sync); a missing variant fails the stage
#   train       full default `fastmnist train --device cuda --impl fused`, wall time to the final model
# Files in $OUT (8 at most come back): stages.tsv build.log tests.log sanitizer.log bench.log bench.json
# train.log summary.txt. The summary prints last: tables, then one PASS/FAIL line per stage, then the verdict.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
export out
: > "$out/stages.tsv"
export FASTMNIST_DATA=${FASTMNIST_DATA:-$PWD/data}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NVIDIA_TF32_OVERRIDE=0  # TF32 off in cuBLAS/cuDNN for every process (train too), not only the bench
total=${GPU_CHECK_SECONDS:-470}
start=$SECONDS
tools_bin=/usr/local/cuda/bin
[ -x "$tools_bin/compute-sanitizer" ] || tools_bin=$(dirname "$(command -v compute-sanitizer || echo /x/x)")

# run_stage NAME CAP LOG CMD...: runs CMD (a command line or an exported function) under timeout (CAP, or what is left), appends to LOG, records the result.
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((total - (SECONDS - start))) t0=$SECONDS rc
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" | tee -a "$log"
  if [ "$limit" -lt 15 ]; then
    printf '%s\tFAIL\t0\tno time left in the %s s budget\n' "$name" "$total" >> "$out/stages.tsv"; return 1
  fi
  timeout -k 10 "$limit" bash -c "$*" >> "$log" 2>&1; rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="timed out after ${limit} s"
  [ $rc -ne 0 ] && [ -z "$note" ] && note="exit code $rc: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-160)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$((SECONDS - t0))" "$note" \
    >> "$out/stages.tsv"
  tail -3 "$log"
  return $rc
}

preflight() {
  nvidia-smi -L || return 1
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -2 || return 1
  python3 benchmarks/gpu_check.py preflight
}
export -f preflight
run_stage preflight 60 "$out/build.log" preflight

build() {
  FORCE_CUDA=1 python3 -m pip install -v --no-build-isolation --no-deps -e . || return 1
  grep -h "fastmnist build:" "$out/build.log" | tail -1
  python3 benchmarks/gpu_check.py fused-built
}
export -f build
run_stage build 200 "$out/build.log" build

tests() {
  python3 -m pytest tests/test_ops.py tests/test_ops_devices.py tests/test_layers.py tests/test_model.py \
    -m needs_cuda -q -rs -p no:cacheprovider --timeout 60 -o addopts="" || return 1
  # any skip is a failure: a skipped CUDA test tested nothing
  local last; last=$(grep -E "passed|failed|error|no tests ran" "$out/tests.log" | tail -1)
  echo "$last" | grep -qE "skipped|no tests ran" && { echo "tests: skips or no tests: $last"; return 1; }
  echo "$last" | grep -q "passed" || { echo "tests: none passed"; return 1; }
}
export -f tests
run_stage tests 120 "$out/tests.log" tests

# compute-sanitizer: exit 0 clean, 9 errors found; a runtime that refuses the device (gVisor) prints so.
sanitize() {
  local tool=$1 log=$out/sanitizer.log t0=$SECONDS rc
  local left=$((total - (SECONDS - start)))
  local limit=$(( 60 < left ? 60 : left ))
  echo "== $tool (limit ${limit} s)" >> "$log"
  if [ "$limit" -lt 15 ]; then printf '%s\tFAIL\t0\tno time left\n' "$tool" >> "$out/stages.tsv"; return; fi
  timeout -k 10 "$limit" "$tools_bin/compute-sanitizer" --tool "$tool" --error-exitcode 9 \
    python3 benchmarks/gpu_check.py small-shapes >> "$log" 2>&1; rc=$?
  local status=FAIL note="exit code $rc"
  if [ $rc -eq 0 ]; then status=PASS; note=""
  elif grep -qiE "device not supported|not supported on this|unable to (initialize|attach)|no CUDA-capable" "$log" \
       && ! grep -q "small-shapes:" "$log"; then
    status=REFUSED; note="the runtime refused the device: $(grep -iE 'not supported|unable|no CUDA' "$log" | head -1 | cut -c1-120)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note="timed out after ${limit} s"
  elif [ $rc -eq 9 ]; then note="$(grep -cE '^========= (Invalid|Error|Race)' "$log") reports; see sanitizer.log"
  fi
  printf '%s\t%s\t%s\t%s\n' "$tool" "$status" "$((SECONDS - t0))" "$note" >> "$out/stages.tsv"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|small-shapes" "$log" | tail -2
}
sanitize memcheck
sanitize racecheck

run_stage bench 100 "$out/bench.log" python3 benchmarks/gpu_check.py bench --json "$out/bench.json"

train() {
  local run=/tmp/gpu_check_train t0=$SECONDS
  rm -rf "$run"
  python3 -m fastmnist.cli train --device cuda --impl fused --out "$run" --no-progress || return 1
  python3 benchmarks/gpu_check.py train-report "$run" "$((SECONDS - t0))"
}
export -f train
run_stage train 200 "$out/train.log" train

python3 benchmarks/gpu_check.py summary "$out" 2>&1 | tee "$out/summary.txt" \
  || echo "gpu_check: FAIL (the summary itself failed)"
echo "gpu_check: $((SECONDS - start)) s in all; logs in $out"
