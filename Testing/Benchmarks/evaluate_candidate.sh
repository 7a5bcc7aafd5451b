#!/bin/bash
# Benchmark of a training run (not bundled) on the four sets of docs/benchmarks.md.
# Usage: Testing/Benchmarks/evaluate_candidate.sh RUN LABEL [METHODS] [EXPORT OPTIONS]
#   RUN: a folder under Training/runs; METHODS: default fmsam-fast (or fmsam-fast,fmsam-accurate);
#   EXPORT OPTIONS: passed to export_model.py, e.g. "--output-smoothing 1.1 --grid 80,100,100"
#   SETS (environment): which sets, default "ixi30 oasis unfamiliar_inverted unfamiliar_gamma"
set -e
cd "$(dirname "$0")/../.."
METHODS=${3:-fmsam-fast}
LABEL=$2
SETS=${SETS:-ixi30 oasis unfamiliar_inverted unfamiliar_gamma}
python3 Training/export_model.py --checkpoint Training/runs/$1/best.pt --out out/$LABEL.pt --no-manifest $4
for name in $SETS; do
  case $name in
    ixi30) set -- Testing/Benchmarks/ixi_val_pairs30.csv ixi30 ;;
    oasis) set -- out/bench/oasis_pairs.csv oasis ;;
    unfamiliar_inverted) set -- out/unfamiliar/inverted_pairs.csv unfamiliar_inverted ;;
    unfamiliar_gamma) set -- out/unfamiliar/gamma_pairs.csv unfamiliar_gamma ;;
    *) echo "unknown set $name" >&2; exit 2 ;;
  esac
  python3 Testing/Benchmarks/benchmark.py run --pairs $1 --out out/bench/$2 --methods $METHODS --threads 1 \
    --weights out/$LABEL.pt --label $LABEL
done
