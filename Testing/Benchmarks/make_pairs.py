"""Write a pairs CSV for ``fmsam evaluate`` from the IXI data folder.

    python Testing/Benchmarks/make_pairs.py --data ../shared/data/ixi --split val \\
        --out Testing/Benchmarks/ixi_val_pairs.csv

All ordered pairs (fixed != moving) of the split's subjects, paths relative to the CSV.
"""
import argparse
import csv
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "ixi"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=0, help="keep only the first N pairs")
    args = parser.parse_args(argv)
    with open(os.path.join(args.data, args.split + ".txt")) as handle:
        subjects = [line.strip() for line in handle if line.strip()]
    base = os.path.dirname(os.path.abspath(args.out))

    def relative(*parts):
        return os.path.relpath(os.path.join(os.path.abspath(args.data), *parts), base)

    pairs = [(f, m) for f in subjects for m in subjects if f != m]
    if args.limit:
        pairs = pairs[:args.limit]
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for fixed, moving in pairs:
            writer.writerow([relative("T1", fixed + "_T1.nii.gz"), relative("T1", moving + "_T1.nii.gz"),
                             relative("labels", fixed + "_labels.nii.gz"),
                             relative("labels", moving + "_labels.nii.gz")])
    print("wrote %d pairs to %s" % (len(pairs), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
