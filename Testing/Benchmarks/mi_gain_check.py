"""How much does the deformable step raise mutual information over the affine alignment, on pairs
where it helps (IXI, gamma, OASIS) and where it fails (inverted contrast)? Calibrates
fmsam.quality.MIN_GAIN. Needs the files of docs/benchmarks.md's "Reproduce" (out/unfamiliar,
out/bench/oasis_pairs.csv). Writes out/bench/mi_gain.csv. Run from the repository root."""
import csv
import os
import sys

import SimpleITK as sitk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Logic"))
from fmsam.evaluate import read_pairs
from fmsam.pipeline import register
from fmsam import fields
from fmsam.quality import deformable_gain
from fmsam.weights import load_model
model = load_model()
out = csv.writer(open("out/bench/mi_gain.csv", "w")); out.writerow(["set", "pair", "mi_affine", "mi_registered", "gain", "dice_affine", "dice_after"])
sets = [("inverted", "out/unfamiliar/inverted_pairs.csv", 10), ("gamma", "out/unfamiliar/gamma_pairs.csv", 10), ("ixi", "Testing/Benchmarks/ixi_val_pairs30.csv", 10), ("oasis", "out/bench/oasis_pairs.csv", 2)]
for name, csvp, n in sets:
    for i, p in enumerate(read_pairs(csvp)[:n]):
        r = register(p["fixed"], p["moving"], p["fixed_labels"], p["moving_labels"], device="cpu", model=model)
        moving = sitk.ReadImage(p["moving"])
        aff = fields.resample(moving, r.fixed, r.affine)
        a, b, w = deformable_gain(r.fixed, aff, r.warped)
        out.writerow([name, i, round(a, 4), round(b, 4), round(b - a, 4), round(r.report["dice_affine"], 4), round(r.report["dice_after"], 4)])
        print(name, i, "gain %+.4f  dice %.3f -> %.3f  warn %s" % (b - a, r.report["dice_affine"], r.report["dice_after"], w is not None), flush=True)
