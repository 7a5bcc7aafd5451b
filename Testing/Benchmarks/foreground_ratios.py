"""Per pairs file: the moving image's foreground volume over the fixed image's (the quantity of
``fmsam.prealign.moving_shows_much_less``), on the images as ``fmsam.register`` normalises them.

Usage: python3 Testing/Benchmarks/foreground_ratios.py NAME=pairs.csv ...
(columns ``fixed``, ``moving``; relative paths are relative to the pairs file's folder)."""
import csv
import os
import sys

import numpy as np

from fmsam import pipeline, prealign


def ratios(path):
    base = os.path.dirname(os.path.abspath(path))
    found = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            inputs = pipeline.read_inputs(os.path.join(base, row["fixed"]), os.path.join(base, row["moving"]), None, None)
            pipeline.normalise_inputs(inputs, "auto", pipeline.TRAINING_ORIENTATION)
            found.append(prealign.foreground_volume(inputs.moving_normalised)
                         / prealign.foreground_volume(inputs.fixed_normalised))
    return np.array(found)


def main(argv):
    for item in argv:
        name, path = item.split("=", 1)
        found = ratios(path)
        below = found[found < prealign.SMALLER_MOVING_RATIO]
        rest = found[found >= prealign.SMALLER_MOVING_RATIO]
        print("%-16s %3d pairs, below %.2f: %2d (%s), others %s" % (
            name, len(found), prealign.SMALLER_MOVING_RATIO, len(below),
            "%.2f-%.2f" % (below.min(), below.max()) if len(below) else "-",
            "%.2f-%.2f" % (rest.min(), rest.max()) if len(rest) else "-"))


if __name__ == "__main__":
    main(sys.argv[1:])
