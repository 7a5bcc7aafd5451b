"""Calibrates the two label-free decisions of ``fmsam.register`` on pairs with labels:

* contrast matching ('auto'): the correlation gain that decides it
  (``fmsam.contrast.MIN_CORRELATION_GAIN``), and fast-mode Dice with matching off and on;
* the failure warning: the gain of the deformable step in foreground mutual information relative
  to the affine alignment's (``fmsam.quality.MIN_RELATIVE_GAIN``), with the default settings.

Sets: IXI val pairs, their thick-slice versions, thick + gamma, thick + inverted contrast, OASIS. Needs
the files of docs/benchmarks.md's "Reproduce" (out/unfamiliar, out/bench/oasis_pairs.csv). Writes
out/bench/label_free_checks.csv (the first pairs of each set, registered with matching off and on).
With ``--gains``: only the correlation gain, on every pair of each set (out/bench/contrast_gains.csv).
Run from the repository root.
"""
import csv
import os
import sys

# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Logic"))

from fmsam.contrast import MIN_CORRELATION_GAIN  # noqa: E402
from fmsam.evaluate import read_pairs  # noqa: E402
from fmsam.pipeline import register  # noqa: E402
from fmsam.weights import load_model  # noqa: E402

SETS = [("ixi", "Testing/Benchmarks/ixi_val_pairs30.csv", 10), ("thick", "out/unfamiliar/thick_pairs.csv", 10),
        ("gamma", "out/unfamiliar/gamma_pairs.csv", 10), ("inverted", "out/unfamiliar/inverted_pairs.csv", 10),
        ("oasis", "out/bench/oasis_pairs.csv", 2)]
FIELDS = ["set", "pair", "correlation_gain", "matched", "dice_affine", "dice_unmatched", "dice_matched",
          "dice_default", "mi_relative_gain_default", "warned"]


def gains():
    model = load_model()
    with open("out/bench/contrast_gains.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["set", "pair", "correlation_gain"])
        for name, pairs_csv, _ in SETS:
            for index, pair in enumerate(read_pairs(pairs_csv)):
                report = register(pair["fixed"], pair["moving"], device="cpu", model=model,
                                  contrast_matching="off").report
                out.writerow([name, index, report["contrast_matching"]["correlation_gain"]])
                handle.flush()


def main():
    os.makedirs("out/bench", exist_ok=True)
    if "--gains" in sys.argv[1:]:
        return gains()
    model = load_model()
    with open("out/bench/label_free_checks.csv", "w", newline="") as handle:
        out = csv.DictWriter(handle, FIELDS)
        out.writeheader()
        for name, pairs_csv, count in SETS:
            for index, pair in enumerate(read_pairs(pairs_csv)[:count]):
                reports = {mode: register(pair["fixed"], pair["moving"], pair["fixed_labels"],
                                          pair["moving_labels"], device="cpu", model=model,
                                          contrast_matching=mode).report
                           for mode in ("off", "on")}
                decision = reports["on"]["contrast_matching"]
                # The default ('auto') run is one of the two: the one its decision picks.
                default = reports["on" if decision["correlation_gain"] >= MIN_CORRELATION_GAIN else "off"]
                row = {"set": name, "pair": index, "correlation_gain": decision["correlation_gain"],
                       "matched": int(default is reports["on"]),
                       "dice_affine": round(default["dice_affine"], 4),
                       "dice_unmatched": round(reports["off"]["dice_after"], 4),
                       "dice_matched": round(reports["on"]["dice_after"], 4),
                       "dice_default": round(default["dice_after"], 4),
                       "mi_relative_gain_default": round(
                           (default["mi_registered"] - default["mi_affine"]) / default["mi_affine"], 4),
                       "warned": int(bool(default["warnings"]))}
                out.writerow(row)
                handle.flush()
                print(" ".join("%s=%s" % item for item in row.items()), flush=True)


if __name__ == "__main__":
    main()
