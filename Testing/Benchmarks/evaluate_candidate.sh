#!/bin/bash
# Fast-mode benchmark of a training run (not bundled) on the four sets of docs/benchmarks.md.
# Usage: Testing/Benchmarks/evaluate_candidate.sh RUN LABEL   (RUN: a folder under Training/runs)
cd "$(dirname "$0")/../.."
python3 Training/export_model.py --checkpoint Training/runs/$1/best.pt --out out/$2.pt --no-manifest
python3 Testing/Benchmarks/benchmark.py run --pairs Testing/Benchmarks/ixi_val_pairs30.csv --out out/bench/ixi30 --methods fmsam-fast --threads 1 --weights out/$2.pt --label $2
python3 Testing/Benchmarks/benchmark.py run --pairs out/bench/oasis_pairs.csv --out out/bench/oasis --methods fmsam-fast --threads 1 --weights out/$2.pt --label $2
for v in inverted gamma; do
  python3 Testing/Benchmarks/benchmark.py run --pairs out/unfamiliar/${v}_pairs.csv --out out/bench/unfamiliar_$v --methods fmsam-fast --threads 1 --weights out/$2.pt --label $2
done
