"""Write a pairs CSV for ``fmsam evaluate`` from the IXI data folder.

    python Testing/Benchmarks/make_pairs.py --data ../shared/data/ixi --split val \\
        --out Testing/Benchmarks/ixi_val_pairs.csv

All ordered pairs (fixed != moving) of the split's subjects, or with ``--offsets 1,2,3`` only the
pairs (i, i + offset): each subject is then fixed and moving equally often. Paths are relative to
the CSV.
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
    parser.add_argument("--offsets", default="", help="e.g. 1,2,3: pairs (i, i+offset) only")
    args = parser.parse_args(argv)
    with open(os.path.join(args.data, args.split + ".txt")) as handle:
        subjects = [line.strip() for line in handle if line.strip()]
    base = os.path.dirname(os.path.abspath(args.out))

    def relative(*parts):
        return os.path.relpath(os.path.join(os.path.abspath(args.data), *parts), base)

    if args.offsets:
        count = len(subjects)
        pairs = [(subjects[i], subjects[(i + int(offset)) % count])
                 for offset in args.offsets.split(",") for i in range(count)]
    else:
        pairs = [(f, m) for f in subjects for m in subjects if f != m]
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
