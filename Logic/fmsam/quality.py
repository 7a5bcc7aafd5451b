"""A label-free check of a result: did the deformable step make the images more alike?

Mutual information does not care about contrast, so it also measures pairs the model cannot
register (different contrasts registered without contrast matching, where the model, trained on
same-contrast pairs with local correlation, makes the alignment worse). Calibrated (docs/benchmarks.md,
Testing/Benchmarks/label_free_checks.py) on the bundled model of its time without contrast matching:
the deformable step raised the mutual information over the affine alignment by +0.12 to +0.19 on 10
IXI pairs, +0.07 to +0.14 on 10 thick-slice gamma pairs and +0.15 / +0.16 on the OASIS pair, but by
-0.044 to +0.028 on the 10 thick-slice inverted-contrast pairs, where it lowered Dice on every pair.
With the defaults of 2026-11-22 (contrast matching, the bundled adam_v5) the 42 calibration pairs
gain +0.09 to +0.30 and none warns. A gain below MIN_GAIN earns a warning.
"""
import numpy as np
import SimpleITK as sitk

#: Smallest mutual-information gain of the deformable step that is not reported as suspicious.
MIN_GAIN = 0.05


def mutual_information(fixed, moving_on_fixed, bins=32, stride=2):
    """Mutual information (nats) of two images on the same grid, from a joint histogram of every
    ``stride``-th voxel along each axis, each image binned between its 0.5th and 99.5th
    percentiles. Deterministic, and about 20 ms for a 2 mm head."""
    pick = (slice(None, None, stride),) * 3
    values = []
    for image in (fixed, moving_on_fixed):
        voxels = np.asarray(sitk.GetArrayViewFromImage(image)[pick], dtype=np.float64).ravel()
        low, high = np.percentile(voxels, [0.5, 99.5])
        values.append(np.clip(voxels, low, high if high > low else low + 1.0))
    joint, _, _ = np.histogram2d(values[0], values[1], bins=bins)
    joint /= joint.sum()
    outer = joint.sum(axis=1)[:, None] * joint.sum(axis=0)[None, :]
    present = joint > 0
    return float(np.sum(joint[present] * np.log(joint[present] / outer[present])))


def normalised_mutual_information(fixed_values, moving_values, bins=32):
    """Studholme's normalised mutual information (H(F) + H(M)) / H(F, M) of two equally long arrays
    of intensities normalised to [0, 1] (values outside are clipped), from a ``bins`` x ``bins``
    joint histogram over [0, 1]^2: 1 for independent images, 2 for images that determine each
    other. 1.0 for fewer than two values. Used to choose among affine candidates
    (:mod:`fmsam.prealign`) and by the cardiac benchmark."""
    fixed_values = np.asarray(fixed_values, dtype=np.float64).ravel()
    moving_values = np.asarray(moving_values, dtype=np.float64).ravel()
    if fixed_values.size < 2:
        return 1.0
    to_bin = lambda v: np.minimum((np.clip(v, 0.0, 1.0) * bins).astype(np.int64), bins - 1)  # noqa: E731
    joint = np.bincount(to_bin(fixed_values) * bins + to_bin(moving_values), minlength=bins * bins)
    joint = joint.astype(np.float64) / fixed_values.size

    def entropy(p):
        p = p[p > 0]
        return float(-np.sum(p * np.log(p)))

    joint_entropy = entropy(joint)
    if joint_entropy == 0.0:
        return 2.0  # both constant: they determine each other
    joint = joint.reshape(bins, bins)
    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / joint_entropy


def deformable_gain(fixed, affine_only, registered):
    """``(mi_affine, mi_registered, warning or None)`` for a result on the fixed grid."""
    before = mutual_information(fixed, affine_only)
    after = mutual_information(fixed, registered)
    warning = None
    if after - before < MIN_GAIN:
        warning = ("the deformable step raised the images' mutual information by only %+.3f (usually "
                   "+0.07 or more): the images may differ in contrast more than contrast matching "
                   "undoes (or it was off), or be unlike the brain MRI the model learned from; check "
                   "the result, or use the affine alignment alone" % (after - before))
    return before, after, warning
