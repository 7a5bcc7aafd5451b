#!/bin/bash
# Whole `fmsam register` time and peak memory on the first N pairs of the IXI 30-pair list
# (docs/benchmarks.md, "Speed"). Run from the repository root on an otherwise idle machine.
# Usage: Testing/Benchmarks/speed.sh [N (default 10)] [weights file]
N=${1:-10}
W=${2:+--weights $2}
tail -n +2 Testing/Benchmarks/ixi_val_pairs30.csv | head -n "$N" | while IFS=, read -r fixed moving _; do
  out=$(mktemp -d)
  /usr/bin/time -f "whole %e s  peak %M KB" fmsam register "Testing/Benchmarks/$fixed" "Testing/Benchmarks/$moving" \
    --out "$out/result" --device cpu --quiet $W
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('  registration', r['seconds'], 'matched', r['contrast_matching']['applied'])" "$out/result/report.json"
  rm -rf "$out"
done
