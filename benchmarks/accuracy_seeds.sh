#!/usr/bin/env bash
# Train the default recipe for each seed and keep the raw logs and metrics:
#   bash benchmarks/accuracy_seeds.sh [SEEDS...]   (default 0 1 2 3 4)
# Results go to benchmarks/results/accuracy/seed<N>/ (metrics.json, curves.png)
# and seed<N>.log; benchmarks/accuracy_table.py summarises them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/accuracy
mkdir -p "$out"
for seed in "${@:-0 1 2 3 4}"; do
  for s in $seed; do
    git rev-parse HEAD > "$out/seed$s.commit"  # the commit measured (metrics.json does not name it)
    fastmnist train --seed "$s" --out "$out/seed$s" --overwrite --no-progress 2>&1 | tee "$out/seed$s.log"
    rm -f "$out/seed$s/checkpoint.pt" "$out/seed$s/model.pt"  # raw figures only; weights stay out of git
  done
done
