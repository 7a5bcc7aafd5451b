#!/bin/bash
# Whole `fmsam register` time and peak memory on three IXI val pairs (docs/benchmarks.md, "Speed").
# Run from the repository root on an otherwise idle machine; optional argument: a weights file.
D=${IXI_T1:-../shared/data/ixi/T1}
W=${1:+--weights $1}
for pair in "IXI012-HH-1211 IXI013-HH-1212" "IXI013-HH-1212 IXI014-HH-1236" "IXI014-HH-1236 IXI015-HH-1258"; do
  set -- $pair
  out=$(mktemp -d)
  /usr/bin/time -f "whole %e s  peak %M KB" fmsam register "$D/$1_T1.nii.gz" "$D/$2_T1.nii.gz" --out "$out/result" --device cpu --quiet $W
  python3 -c "import json, sys; print('  registration', json.load(open(sys.argv[1]))['seconds'])" "$out/result/report.json"
  rm -rf "$out"
done
