#!/usr/bin/env bash
# Train a model's recipe (`fastmnist train --model MODEL`, no other flag) for each seed and keep the raw
# metrics:   bash benchmarks/accuracy_seeds.sh MODEL [SEEDS...]   (default seeds 0 1 2 3 4)
# Results go to benchmarks/results/seeds/MODEL/seed<N>/ (metrics.json, curves.png), with seed<N>.log and
# seed<N>.commit (the commit measured) beside them; benchmarks/tables.py renders them into docs/recipe.md.
# Run nothing else CPU-heavy meanwhile: the seconds of training per run are part of the table.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: bash benchmarks/accuracy_seeds.sh MODEL [SEEDS...]}
shift
out=benchmarks/results/seeds/$model
mkdir -p "$out"
for s in "${@:-0 1 2 3 4}"; do
  for seed in $s; do
    git rev-parse HEAD > "$out/seed$seed.commit"
    PYTHONUNBUFFERED=1 fastmnist train --model "$model" --seed "$seed" --out "$out/seed$seed" --overwrite \
      --no-progress 2>&1 | tee "$out/seed$seed.log"
    rm -f "$out/seed$seed/checkpoint.pt" "$out/seed$seed/model.pt"  # raw figures only; weights stay out of git
  done
done
