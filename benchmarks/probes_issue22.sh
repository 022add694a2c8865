#!/usr/bin/env bash
# Issue 22's probes: each candidate recipe/layout on held-out probe seeds (10, 11, 12; seeds 0-4 are
# kept for the record), one run at a time, into benchmarks/results/probes-issue22/PROBE/seedN{,.log}.
# Then: python benchmarks/probes_issue22.py renders the folder's README.md from the runs.
#   benchmarks/probes_issue22.sh                  every probe below, on every probe seed
#   benchmarks/probes_issue22.sh default-4ep-bn50 one probe
#   SEEDS="10" benchmarks/probes_issue22.sh ...   other seeds
# A probe already in its folder (metrics.json) is skipped, so the script resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/probes-issue22}
SEEDS=${SEEDS:-"10 11 12"}
EXTRA=${EXTRA:-}  # more flags for every run; a smoke check: OUT=/tmp/p EXTRA="--limit-train 512 --epochs 1"

# Every flag a probe is about is given, so it means the same whatever today's recipe is (the probes
# below, made on the recipes before issue 22, led them to 4 epochs and the BN recompute, and tiny to
# tinyD's layout).
# tiny4k-bn50, tiny5k-bn50, tiny16a-bn50, tiny16b-bn50, tinyC-bn50 and tinyD-bn50 ran `--model NAME
# --bn-recompute-batches 50` (15 epochs, tiny's) at the commit in their seedN.commit; those layouts are gone
# from fastmnist/model.py but tinyD's, which is tiny's. tiny-b64* ran on tiny16b's layout, tiny's then.
# The ablation of issue 22 is three of these on the record's seeds:
#   OUT=benchmarks/results/ablation-issue22 SEEDS="0 1 2 3 4" bash benchmarks/probes_issue22.sh \
#     default-8ep default-4ep tiny-avgbn
declare -A PROBES=(
  [default-8ep]="--model default --epochs 8 --bn-recompute-batches 0"
  [default-8ep-bn50]="--model default --epochs 8 --bn-recompute-batches 50"
  [default-4ep]="--model default --epochs 4 --bn-recompute-batches 0"
  [default-4ep-bn50]="--model default --epochs 4 --bn-recompute-batches 50"
  [default-3ep-bn50]="--model default --epochs 3 --bn-recompute-batches 50"
  [tiny-avgbn]="--model tiny --epochs 15 --bn-recompute-batches 0"
  [tiny-b64-bn50]="--model tiny --epochs 15 --batch-size 64 --lr 0.2 --bn-recompute-batches 50"
  [tiny-b64-lr0.1-bn50]="--model tiny --epochs 15 --batch-size 64 --lr 0.1 --bn-recompute-batches 50"
)
ORDER="default-4ep-bn50 default-3ep-bn50 default-4ep default-8ep-bn50 default-8ep"

for probe in ${@:-$ORDER}; do
  flags=${PROBES[$probe]:?"unknown probe $probe; known: ${!PROBES[*]}"}
  for seed in $SEEDS; do
    dir=$OUT/$probe/seed$seed
    [ -f "$dir/metrics.json" ] && { echo "$dir: done, skipped"; continue; }
    mkdir -p "$OUT/$probe"
    echo "$probe seed $seed: fastmnist train $flags --seed $seed"
    # shellcheck disable=SC2086  # flags and EXTRA are lists of words
    python -m fastmnist.cli train $flags $EXTRA --seed "$seed" --out "$dir" --overwrite --no-progress > "$dir.log" 2>&1
    git rev-parse --short HEAD > "$dir.commit"
    tail -1 "$dir.log"
  done
done
