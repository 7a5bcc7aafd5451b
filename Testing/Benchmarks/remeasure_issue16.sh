#!/bin/bash
# Issue 16 re-measurement, run on an otherwise idle machine (2 cores): fast mode (speed.sh 10), the
# accurate mode's whole command on the same 10 pairs, and the profile picture of one fast command.
# Usage: Testing/Benchmarks/remeasure_issue16.sh
cd "$(dirname "$0")/../.."
echo "== fast"; Testing/Benchmarks/speed.sh 10 2>&1 | grep -E "whole|registration"
echo "== accurate"
tail -n +2 Testing/Benchmarks/ixi_val_pairs30.csv | head -n 10 | while IFS=, read -r fixed moving _; do
  out=$(mktemp -d)
  /usr/bin/time -f "whole %e s  peak %M KB" fmsam register "Testing/Benchmarks/$fixed" "Testing/Benchmarks/$moving" \
    --out "$out/result" --device cpu --quiet --mode accurate
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('  registration', r['seconds']['total'])" "$out/result/report.json"
  rm -rf "$out"
done 2>&1 | grep -E "whole|registration"
echo "== profile"
python3 Testing/Benchmarks/profile_register.py Testing/Data/ixi_sample/T1/IXI012-HH-1211_T1.nii.gz \
    Testing/Data/ixi_sample/T1/IXI013-HH-1212_T1.nii.gz --repeat 3 --picture docs/images/speed_profile.png --csv out/speed16/profile_pillow.csv
