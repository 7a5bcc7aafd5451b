"""Overlap metrics on integer label arrays."""
import numpy as np


def dice_per_label(fixed_labels, warped_labels, labels=None):
    """Dice of each label (> 0) between two integer arrays of the same shape.

    ``labels`` defaults to the labels present in both arrays. Returns ``{label: dice}``.
    """
    fixed_labels = np.asarray(fixed_labels).ravel().astype(np.int64)
    warped_labels = np.asarray(warped_labels).ravel().astype(np.int64)
    if labels is None:
        labels = np.intersect1d(np.unique(fixed_labels), np.unique(warped_labels))
    labels = [int(label) for label in labels if label > 0]
    size = max([int(fixed_labels.max()), int(warped_labels.max())] + labels) + 1
    fixed_counts = np.bincount(fixed_labels, minlength=size)
    warped_counts = np.bincount(warped_labels, minlength=size)
    both = fixed_labels == warped_labels
    overlap = np.bincount(fixed_labels[both], minlength=size)
    result = {}
    for label in labels:
        total = fixed_counts[label] + warped_counts[label]
        result[label] = 2.0 * overlap[label] / total if total else float("nan")
    return result


def mean_dice(fixed_labels, warped_labels, labels=None):
    """Mean Dice over ``labels`` (default: labels present in both arrays); NaN if there are none."""
    values = list(dice_per_label(fixed_labels, warped_labels, labels).values())
    return float(np.mean(values)) if values else float("nan")


def labels_in_both(fixed_labels, moving_labels):
    """Labels (> 0) present in both label maps: the set the reported mean Dice is taken over."""
    common = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels))
    return common[common > 0]
