"""When does the affine's reverse direction win? Per pair, on the engine's path (read, reorient,
normalise, block-average): ``alignment_score`` of the forward affine, of the inverse of the reverse
one, of the moments-centred start and of the identity; zero and foreground fractions of both images;
label Dice through the forward and through the reversed affine; seconds of the forward one.

Usage: python3 Testing/Benchmarks/affine_directions.py OUT.csv NAME=pairs.csv ...
(columns ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``, relative to the pairs file)."""
import csv
import os
import sys
import time

import SimpleITK as sitk

from fmsam import fields, pipeline, prealign
from fmsam.metrics import labels_in_both, mean_dice

COLUMNS = ["set", "pair", "s_fwd", "s_rev", "s_centred", "s_identity", "zero_fixed", "zero_moving",
           "fg_fixed", "fg_moving", "dice_fwd", "dice_rev", "t_fwd"]


def pair_row(row):
    """The figures of one pair (a dict of the pairs file's columns, absolute paths), in COLUMNS'
    order after ``set`` and ``pair``. The two directions are ``fmsam.prealign``'s own stages."""
    inputs = pipeline.read_inputs(row["fixed"], row["moving"], row["fixed_labels"], row["moving_labels"])
    pipeline.normalise_inputs(inputs, "auto", pipeline.TRAINING_ORIENTATION)
    fixed, moving, shrunk = prealign.affine_inputs(inputs.fixed_normalised, inputs.moving_normalised)
    quiet = prealign._Progress(None, 1)
    start = time.perf_counter()
    forward, centred = prealign._rigid_then_affine(fixed, moving, 60, 0.10, quiet, shrunk)
    seconds = time.perf_counter() - start
    backward, _ = prealign._rigid_then_affine(moving, fixed, 60, 0.10, quiet, shrunk)
    reverse = sitk.AffineTransform(backward.GetInverse())
    scores = [prealign.alignment_score(fixed, moving, x) for x in (forward, reverse, centred, sitk.AffineTransform(3))]
    fixed_voxels = sitk.GetArrayViewFromImage(inputs.fixed_normalised)
    moving_voxels = sitk.GetArrayViewFromImage(inputs.moving_normalised)
    fixed_labels = sitk.GetArrayFromImage(inputs.fixed_labels)
    labels = labels_in_both(fixed_labels, sitk.GetArrayFromImage(inputs.moving_labels))
    dice = [mean_dice(fixed_labels, sitk.GetArrayFromImage(
        fields.resample(inputs.moving_labels, inputs.fixed, x, nearest=True)), labels) for x in (forward, reverse)]
    return (["%.4f" % v for v in scores]
            + ["%.3f" % (fixed_voxels == 0).mean(), "%.3f" % (moving_voxels == 0).mean(),
               "%.3f" % (fixed_voxels > prealign.FOREGROUND).mean(), "%.3f" % (moving_voxels > prealign.FOREGROUND).mean(),
               "%.4f" % dice[0], "%.4f" % dice[1], "%.3f" % seconds])


def main(argv):
    with open(argv[0], "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(COLUMNS)
        for item in argv[1:]:
            name, path = item.split("=", 1)
            base = os.path.dirname(os.path.abspath(path))
            with open(path) as pairs:
                for n, row in enumerate(csv.DictReader(pairs)):
                    out.writerow([name, n] + pair_row({k: os.path.join(base, v) for k, v in row.items()}))
                    handle.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
