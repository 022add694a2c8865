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
# Stages, in the order that spends the GPU on what matters most first (each
# writes one line to $OUT/stages.tsv: name, PASS|FAIL|REFUSED, seconds, note):
#   preflight   CUDA visible to torch, nvcc version, MNIST present
#   build       setup.py build_ext --inplace with FORCE_CUDA=1 LINEINFO=1 (TORCH_CUDA_ARCH_LIST=9.0),
#               then fail unless the package imports with CUDA kernels for every op
#   tests       the CUDA tests alone (-m needs_cuda), each with a timeout; any skip is a failure
#   bench       step timing, TF32 off: stock eager, channels_last, torch.compile, fused, fused in a CUDA graph;
#               CUDA events; bench.json rewritten after each variant and round; a missing variant fails it
#   train       full default `fastmnist train --device cuda --impl fused`; fails below 99% test accuracy
#   memcheck    compute-sanitizer --tool memcheck on small shapes, checked against float64 CPU references
#   racecheck   compute-sanitizer --tool racecheck, same shapes
# Every stage after the build imports fastmnist and refuses to run without its CUDA kernels. A failing
# stage's note says what to fix without rerunning: the compiler's first error, the failing tests and their
# greatest differences, the failed bench variants, the accuracy reached, the sanitizer's first report with
# its source line (-lineinfo). REFUSED (the runtime would not let compute-sanitizer attach, as under
# gVisor) is its own word, never given to a timeout, and makes the verdict REFUSED rather than PASS.
# Files in $OUT (8 at most come back): stages.tsv build.log tests.log bench.log bench.json train.log
# sanitizer.log summary.txt. The summary prints last: tables, one line per stage, then the verdict.
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
sanitizer=/usr/local/cuda/bin/compute-sanitizer
[ -x "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer || echo "compute-sanitizer")

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "$4" | tr '\t\n' '  ' | sed 's/ *$//' | cut -c1-400)" \
    >> "$out/stages.tsv"
  echo "$1: $2${4:+ ($4)}"
}

# The stage's time limit: CAP, or what is left of the total; 0 when under 15 s are left.
limit_for() {
  local left=$((total - (SECONDS - start)))
  local limit=$(( $1 < left ? $1 : left ))
  [ "$limit" -lt 15 ] && limit=0
  echo "$limit"
}

# run_stage NAME CAP LOG CMD...: runs CMD (a command line or an exported function) under timeout,
# appends its output to LOG (and to a per-stage copy the explanation reads), records the result.
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local limit t0=$SECONDS rc part=$out/.$1.part
  limit=$(limit_for "$cap")
  echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" | tee -a "$log"
  if [ "$limit" -eq 0 ]; then
    record "$name" FAIL 0 "not run: no time left in the ${total} s budget (earlier stages used it)"; return 1
  fi
  timeout -k 10 "$limit" bash -c "$*" > "$part" 2>&1; rc=$?
  cat "$part" >> "$log"
  if [ $rc -eq 0 ]; then
    record "$name" PASS "$((SECONDS - t0))" ""
  else
    local why; why=$(python3 benchmarks/gpu_check.py explain "$name" "$part" 2>&1 | tail -1)
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="timed out after ${limit} s; $why"
    record "$name" FAIL "$((SECONDS - t0))" "exit code $rc: $why"
  fi
  rm -f "$part"
  return $rc
}

preflight() {
  nvidia-smi -L || { echo "preflight: nvidia-smi found no GPU"; return 1; }
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -2 || { echo "preflight: no nvcc"; return 1; }
  python3 benchmarks/gpu_check.py preflight
}
export -f preflight
run_stage preflight 60 "$out/build.log" preflight

# build_ext --inplace (not pip install): the package runs from this checkout through PYTHONPATH, and no
# environment is modified. LINEINFO=1 puts source lines into the sanitizer's reports.
build() {
  FORCE_CUDA=1 LINEINFO=1 python3 setup.py build_ext --inplace || return 1
  python3 benchmarks/gpu_check.py fused-built
}
export -f build
run_stage build 220 "$out/build.log" build

tests() {
  python3 -m pytest tests/test_ops.py tests/test_ops_devices.py tests/test_layers.py tests/test_model.py \
    -m needs_cuda -q -rfEs -p no:cacheprovider --timeout 60 -o addopts="" || return 1
  python3 benchmarks/gpu_check.py require-cuda-kernels tests  # a skip-free run of a build without them is no pass
}
export -f tests
# The skip rule reads the pytest summary of this stage's own output (explain tests does the same).
tests_no_skips() {
  tests > "$out/.tests.out" 2>&1; local rc=$?
  cat "$out/.tests.out"
  local last; last=$(grep -E "passed|failed|error|no tests ran" "$out/.tests.out" | tail -1)
  rm -f "$out/.tests.out"
  [ $rc -ne 0 ] && return $rc
  echo "$last" | grep -qE "skipped|no tests ran" && { echo "tests: a CUDA test was skipped or none ran: $last"; return 1; }
  echo "$last" | grep -q "passed" || { echo "tests: none passed: $last"; return 1; }
}
export -f tests_no_skips
run_stage tests 150 "$out/tests.log" tests_no_skips

run_stage bench 100 "$out/bench.log" python3 benchmarks/gpu_check.py bench --json "$out/bench.json"

train() {
  local run=/tmp/gpu_check_train t0=$SECONDS
  rm -rf "$run"
  python3 benchmarks/gpu_check.py require-cuda-kernels train || return 1
  python3 -m fastmnist.cli train --device cuda --impl fused --out "$run" --no-progress || return 1
  python3 benchmarks/gpu_check.py train-report "$run" "$((SECONDS - t0))"
}
export -f train
run_stage train 200 "$out/train.log" train

# compute-sanitizer: exit 0 clean, 9 errors found. The order of the tests below matters: a timeout is a
# FAIL whatever the log says, and REFUSED needs the runtime's refusal with no case having run.
sanitize() {
  local tool=$1 log=$out/sanitizer.log part=$out/.$1.part t0=$SECONDS rc limit
  limit=$(limit_for 60)
  echo "== $tool (limit ${limit} s, at $((SECONDS - start)) s)" >> "$log"
  if [ "$limit" -eq 0 ]; then
    record "$tool" FAIL 0 "not run: no time left in the ${total} s budget (earlier stages used it)"; return
  fi
  if ! command -v "$sanitizer" > /dev/null; then
    echo "$tool: compute-sanitizer not found (/usr/local/cuda/bin, PATH)" >> "$log"
    record "$tool" FAIL 0 "compute-sanitizer not found in /usr/local/cuda/bin or on PATH"; return
  fi
  timeout -k 10 "$limit" "$sanitizer" --tool "$tool" --error-exitcode 9 --show-backtrace no \
    python3 benchmarks/gpu_check.py small-shapes > "$part" 2>&1; rc=$?
  cat "$part" >> "$log"
  local status=FAIL note
  if [ $rc -eq 0 ]; then
    status=PASS note=""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note="timed out after ${limit} s; $(python3 benchmarks/gpu_check.py explain "$tool" "$part" | tail -1)"
  elif grep -qiE "device not supported|not supported on this|unable to (initialize|attach)|no CUDA-capable" "$part" \
       && ! grep -q "small-shapes: case" "$part"; then
    status=REFUSED
    note="the runtime refused the device: $(grep -iE 'not supported|unable|no CUDA' "$part" | head -1 | cut -c1-160)"
  else
    note="exit code $rc: $(python3 benchmarks/gpu_check.py explain "$tool" "$part" | tail -1)"
  fi
  rm -f "$part"
  record "$tool" "$status" "$((SECONDS - t0))" "$note"
}
sanitize memcheck
sanitize racecheck

python3 benchmarks/gpu_check.py summary "$out" 2>&1 | tee "$out/summary.txt" \
  || echo "gpu_check: FAIL (the summary itself failed)"
echo "gpu_check: $((SECONDS - start)) s in all; logs in $out"
