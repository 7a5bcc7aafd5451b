"""Overlap metrics on integer label arrays."""
import numpy as np


def _positions(values, labels):
    """Index of each value in the sorted ``labels``, plus one; 0 for values not among them."""
    position = np.searchsorted(labels, values)
    found = np.zeros(values.shape, dtype=bool)
    inside = position < len(labels)
    found[inside] = labels[position[inside]] == values[inside]
    return np.where(found, position + 1, 0)


#: Labels below this are counted by value (fast); a map with larger labels is counted by the labels'
#: positions, so that a label of 4e9 does not ask for a 32 GB count array.
DIRECT_COUNT_LIMIT = 1 << 24


def dice_per_label(fixed_labels, warped_labels, labels=None):
    """Dice of each label (> 0) between two integer arrays of the same shape.

    ``labels`` defaults to the labels present in both arrays. Returns ``{label: dice}``.
    """
    fixed_labels = np.asarray(fixed_labels).ravel().astype(np.int64)
    warped_labels = np.asarray(warped_labels).ravel().astype(np.int64)
    if labels is None:
        labels = np.intersect1d(np.unique(fixed_labels), np.unique(warped_labels))
    labels = [int(label) for label in labels if label > 0]
    largest = max([int(fixed_labels.max()), int(warped_labels.max())] + labels)
    if largest < DIRECT_COUNT_LIMIT:
        wanted = None
        fixed_at, warped_at, size = fixed_labels, warped_labels, largest + 1
    else:
        wanted = np.unique(np.array(labels, dtype=np.int64))
        fixed_at, warped_at = _positions(fixed_labels, wanted), _positions(warped_labels, wanted)
        size = len(wanted) + 1
    fixed_counts = np.bincount(fixed_at, minlength=size)
    warped_counts = np.bincount(warped_at, minlength=size)
    overlap = np.bincount(fixed_at[fixed_at == warped_at], minlength=size)
    result = {}
    for label in labels:
        index = label if wanted is None else int(np.searchsorted(wanted, label)) + 1
        total = fixed_counts[index] + warped_counts[index]
        result[label] = 2.0 * overlap[index] / total if total else float("nan")
    return result


def mean_dice(fixed_labels, warped_labels, labels=None):
    """Mean Dice over ``labels`` (default: labels present in both arrays); NaN if there are none."""
    values = list(dice_per_label(fixed_labels, warped_labels, labels).values())
    return float(np.mean(values)) if values else float("nan")


def labels_in_both(fixed_labels, moving_labels):
    """Labels (> 0) present in both label maps: the set the reported mean Dice is taken over."""
    common = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels))
    return common[common > 0]


def dice_report(fixed_labels, moving_labels, labels_through):
    """Dice figures of report.json for SimpleITK label maps: ``fixed_labels`` on the fixed grid,
    ``moving_labels`` on the moving grid, ``labels_through(transform)`` the moving labels resampled
    onto the fixed grid (nearest neighbour) through a transform, for no transform ('initial'), the
    affine ('affine') and the registration ('after'): ``{"dice_labels": n, "dice_initial": ...}``.
    ``labels_through`` gets ``None``, ``"affine"`` or ``"registration"``. No shared label: only
    ``dice_labels: 0`` (NaN is not JSON)."""
    import SimpleITK as sitk

    fixed_array = sitk.GetArrayViewFromImage(fixed_labels)
    labels = labels_in_both(fixed_array, sitk.GetArrayViewFromImage(moving_labels))
    report = {"dice_labels": int(len(labels))}
    if len(labels):
        for key, which in (("dice_initial", None), ("dice_affine", "affine"), ("dice_after", "registration")):
            resampled = labels_through(which)  # kept alive while its array view is read
            report[key] = mean_dice(fixed_array, sitk.GetArrayViewFromImage(resampled), labels)
    return report
