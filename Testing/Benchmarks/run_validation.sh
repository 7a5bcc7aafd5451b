#!/usr/bin/env bash
# Reproduce the validation figures of the model card (CPU, 2 cores, about 15 minutes).
# Usage: bash Testing/Benchmarks/run_validation.sh [OUT_DIR]   (needs ../shared/data beside the repo)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out/validation}
mkdir -p "$out"
python3 Testing/Benchmarks/make_pairs.py --data ../shared/data/ixi --split val --offsets 1,2,3 \
    --out Testing/Benchmarks/ixi_val_pairs30.csv
# Fast mode (the default: no instance optimisation)
fmsam evaluate --pairs Testing/Benchmarks/ixi_val_pairs30.csv --out "$out/ixi_val30_fast.csv" --device cpu
# Accurate mode (50 instance-optimisation steps)
fmsam evaluate --pairs Testing/Benchmarks/ixi_val_pairs30.csv --out "$out/ixi_val30_io50.csv" --device cpu --io-steps 50
# Cross-dataset: the OASIS pair, both directions, with tissue labels
# (the label files' headers differ from their images': copies with the image geometry are used)
o=../shared/data/oasis_pair
python3 Testing/Benchmarks/oasis_labels_with_image_geometry.py $o "$out/oasis_labels"
for dir in AB BA; do
  f=${dir:0:1}; m=${dir:1:1}
  fmsam register $o/image_${f}_160x192x144.nii.gz $o/image_${m}_160x192x144.nii.gz --out "$out/oasis_$dir" \
      --fixed-labels "$out/oasis_labels/seg_${f}.nii.gz" --moving-labels "$out/oasis_labels/seg_${m}.nii.gz" \
      --device cpu --quiet
done
