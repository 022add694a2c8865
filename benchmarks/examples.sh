#!/usr/bin/env bash
# The README's examples of `fastmnist eval`, `predict` and of a user's mistake, recorded as each command's
# real output so that benchmarks/tables.py renders them (an example is never retyped):
#   bash benchmarks/examples.sh        # a minute or two on 2 cores
# The model is a `tiny` one trained for 2 epochs on 10,000 images (cheap, hence its modest accuracy); its
# metrics.json stays in benchmarks/results/examples/run/, its weights do not (git ignores *.pt there).
set -euo pipefail
cd "$(dirname "$0")/results/examples"

# record FILE CMD...: "$ CMD" then what it printed (stdout and stderr); a failing command is recorded too.
record() {
  local file=$1; shift
  { echo "\$ $*"; "$@" 2>&1 || true; } > "$file"
  cat "$file"
}

fastmnist train --model tiny --epochs 2 --limit-train 10000 --out run --overwrite --no-progress
record eval.txt fastmnist eval --checkpoint run/model.pt --report report
(cd digits && record ../predict.txt fastmnist predict --checkpoint ../run/model.pt seven.png three.jpg notes.txt)
record error-checkpoint.txt fastmnist eval --checkpoint nope.pt
record error-flag.txt fastmnist train --epochs 0
rm -rf report run/checkpoint.pt run/model.pt run/curves.png
