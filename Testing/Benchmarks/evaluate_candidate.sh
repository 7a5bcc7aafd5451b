#!/bin/bash
# Benchmark of a training run (not bundled) on the four sets of docs/benchmarks.md.
# Usage: Testing/Benchmarks/evaluate_candidate.sh RUN LABEL [METHODS]
#   RUN: a folder under Training/runs; METHODS: default fmsam-fast (or fmsam-fast,fmsam-accurate)
set -e
cd "$(dirname "$0")/../.."
METHODS=${3:-fmsam-fast}
LABEL=$2
python3 Training/export_model.py --checkpoint Training/runs/$1/best.pt --out out/$LABEL.pt --no-manifest
for set in "Testing/Benchmarks/ixi_val_pairs30.csv ixi30" "out/bench/oasis_pairs.csv oasis" \
           "out/unfamiliar/inverted_pairs.csv unfamiliar_inverted" "out/unfamiliar/gamma_pairs.csv unfamiliar_gamma"; do
  set -- $set
  python3 Testing/Benchmarks/benchmark.py run --pairs $1 --out out/bench/$2 --methods $METHODS --threads 1 \
    --weights out/$LABEL.pt --label $LABEL
done
