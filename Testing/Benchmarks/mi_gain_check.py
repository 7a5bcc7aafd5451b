"""How much does the deformable step raise mutual information over the affine alignment, on pairs
where it helps (IXI, gamma, OASIS) and where it fails (inverted contrast)? Calibrates
fmsam.quality.MIN_GAIN. Needs the files of docs/benchmarks.md's "Reproduce" (out/unfamiliar,
out/bench/oasis_pairs.csv). Writes out/bench/mi_gain.csv. Run from the repository root."""
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Logic"))

from fmsam.evaluate import read_pairs  # noqa: E402
from fmsam.pipeline import register  # noqa: E402
from fmsam.weights import load_model  # noqa: E402

SETS = [("inverted", "out/unfamiliar/inverted_pairs.csv", 10), ("gamma", "out/unfamiliar/gamma_pairs.csv", 10),
        ("ixi", "Testing/Benchmarks/ixi_val_pairs30.csv", 10), ("oasis", "out/bench/oasis_pairs.csv", 2)]


def main():
    model = load_model()
    with open("out/bench/mi_gain.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["set", "pair", "mi_affine", "mi_registered", "gain", "dice_affine", "dice_after"])
        for name, pairs_csv, count in SETS:
            for index, pair in enumerate(read_pairs(pairs_csv)[:count]):
                # register() reports the check itself (fmsam.quality), as every run does.
                report = register(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"],
                                  device="cpu", model=model).report
                gain = report["mi_registered"] - report["mi_affine"]
                out.writerow([name, index, round(report["mi_affine"], 4), round(report["mi_registered"], 4),
                              round(gain, 4), round(report["dice_affine"], 4), round(report["dice_after"], 4)])
                print(name, index, "gain %+.4f  dice %.3f -> %.3f  warn %s" % (
                    gain, report["dice_affine"], report["dice_after"], bool(report["warnings"])), flush=True)


if __name__ == "__main__":
    main()
