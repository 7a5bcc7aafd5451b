#!/bin/bash
# Whole fast `fmsam register` on the first N IXI 30 pairs, engine versions (Logic folders) in turn pair by pair.
# Usage (repository root, idle machine): Testing/Benchmarks/speed_versions.sh N LOGIC_DIR... > LOG
# (a LOGIC_DIR is an engine's Logic folder, e.g. of a `git worktree` at another commit);
# then python3 Testing/Benchmarks/speed_summary.py LOG
N=$1; shift
tail -n +2 Testing/Benchmarks/ixi_val_pairs30.csv | head -n "$N" | while IFS=, read -r fixed moving _; do
  for logic in "$@"; do
    out=$(mktemp -d)
    /usr/bin/time -o "$out/time.txt" -f "$logic whole %e s peak %M KB" python3 -c "import sys; sys.path.insert(0, sys.argv[1]); from fmsam.cli import run_and_exit; run_and_exit(sys.argv[2:])" \
      "$logic" register "Testing/Benchmarks/$fixed" "Testing/Benchmarks/$moving" --out "$out/result" --device cpu --quiet
    cat "$out/time.txt"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['seconds']; print('  $logic', r['affine'], r['network'], r['total'])" "$out/result/report.json"
    rm -rf "$out"
  done
done
