"""A label-free check of a result: did the deformable step make the images more alike?

Mutual information does not care about contrast, so it also measures pairs the model cannot
register (different contrasts registered without contrast matching, where the model, trained on
same-contrast pairs with local correlation, makes the alignment worse).

It is measured inside the fixed image's foreground (:func:`foreground_mutual_information`), and the
deformable step is judged by its gain *relative* to the affine alignment's, so the check does not
depend on how much background, noise or how many slices an image has. The first version (the mutual
information of every second voxel of the whole grid, warning below an absolute gain of 0.05,
calibrated on brains) warned on 9 of the 16 cardiac runs of the selection patients (thin short-axis
stacks, mostly noise and chest wall), 8 of them runs whose similarity the deformable step had raised:
there the whole grid's mutual information is small and much of it background's, so gains were +0.002
to +0.08 whatever the result. Calibration (docs/benchmarks.md, "The failure warning"; fast mode, bundled adam_v5): the
deformable step raised the foreground mutual information by +33 % to +102 % on 42 brain pairs (IXI,
thick slices, gamma, inverted, OASIS), by +13 % to +168 % on 15 of the 16 cardiac selection runs, and
lowered it by 48 % to 60 % on the 10 thick inverted-contrast brain pairs registered without contrast
matching (the failure this check is for) and by 5 % on one cardiac pair (212_DE <- 101_DE, where it
also lowered the benchmark's NMI below the affine's). A relative gain below MIN_RELATIVE_GAIN earns a
warning.
"""
import numpy as np
import SimpleITK as sitk

#: Smallest gain of the deformable step in foreground mutual information, as a fraction of the
#: affine alignment's, that is not reported as suspicious: the step must not lower it.
MIN_RELATIVE_GAIN = 0.0
#: Fixed-image voxels above this fraction of its 0.5th-99.5th percentile range are its foreground.
FOREGROUND = 0.05
#: Axes with fewer voxels are sampled at every voxel (a thin stack keeps every slice).
MIN_VOXELS_TO_STRIDE = 8


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


def _scaled(voxels):
    """Voxels scaled from their 0.5th-99.5th percentiles to [0, 1] (clipped)."""
    low, high = np.percentile(voxels, [0.5, 99.5])
    if high <= low:
        low, high = float(voxels.min()), float(voxels.max())
    return np.clip((voxels - low) / (high - low if high > low else 1.0), 0.0, 1.0)


def foreground_mutual_information(fixed, moving_on_fixed, bins=32, stride=2):
    """Mutual information (nats) of two images on the same grid inside the fixed image's foreground:
    each image scaled between its 0.5th and 99.5th percentiles to [0, 1], the fixed voxels above
    :data:`FOREGROUND` counted, from a ``bins`` x ``bins`` joint histogram over [0, 1]^2. Every
    ``stride``-th voxel along axes of at least :data:`MIN_VOXELS_TO_STRIDE` voxels, every voxel along
    thinner ones. 0.0 when the foreground has fewer than two voxels."""
    pick = tuple(slice(None, None, stride if n >= MIN_VOXELS_TO_STRIDE else 1) for n in fixed.GetSize()[::-1])
    fixed_values, moving_values = (
        _scaled(np.asarray(sitk.GetArrayViewFromImage(image)[pick], dtype=np.float64).ravel())
        for image in (fixed, moving_on_fixed))
    inside = fixed_values > FOREGROUND
    if np.count_nonzero(inside) < 2:
        return 0.0
    to_bin = lambda v: np.minimum((v * bins).astype(np.int64), bins - 1)  # noqa: E731
    joint = np.bincount(to_bin(fixed_values[inside]) * bins + to_bin(moving_values[inside]),
                        minlength=bins * bins).astype(np.float64).reshape(bins, bins)
    joint /= joint.sum()
    outer = joint.sum(axis=1)[:, None] * joint.sum(axis=0)[None, :]
    present = joint > 0
    return float(np.sum(joint[present] * np.log(joint[present] / outer[present])))


def deformable_gain(fixed, affine_only, registered):
    """``(mi_affine, mi_registered, warning or None)`` for a result on the fixed grid: the
    :func:`foreground_mutual_information` of the fixed image with the affinely aligned and with the
    registered moving image; a warning when the registered one is not at least
    ``1 + MIN_RELATIVE_GAIN`` times the affine one."""
    before = foreground_mutual_information(fixed, affine_only)
    after = foreground_mutual_information(fixed, registered)
    warning = None
    if after - before < MIN_RELATIVE_GAIN * before:
        warning = ("the deformable step changed the images' mutual information (inside the fixed image's "
                   "foreground) by %+.0f %% of the affine alignment's (usually +10 %% or more): the images "
                   "may differ in contrast more than contrast matching undoes (or it was off), or be unlike "
                   "the images the model learned from; check the result, or use the affine alignment "
                   "alone" % (100.0 * (after - before) / before if before > 0 else 0.0))
    return before, after, warning
