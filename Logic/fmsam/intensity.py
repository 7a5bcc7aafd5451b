"""Intensity normalisation to the [0, 1] range the network was trained on.

MR has no absolute scale, so it is scaled between two percentiles. CT is in Hounsfield units, so a
fixed mapping keeps tissue contrast comparable between scans (uniGradICON clips to a fixed window).
"""
import numpy as np
import SimpleITK as sitk

from .options import MODALITIES

#: Hounsfield units to [0, 1] for CT: piecewise linear through these (HU, value) knots (HU
#: increasing), clipped to the first and last value outside them.
CT_KNOTS_HU = ((-150.0, 0.0), (250.0, 1.0))
#: Percentiles mapped to 0 and 1 for MR (and anything else that is not CT).
MR_PERCENTILES = (0.5, 99.5)


def detect_modality(voxels):
    """'ct' when the image looks like Hounsfield units (a good share of air near -1000), else 'mr'."""
    voxels = np.asarray(voxels)
    if voxels.min() > -500:
        return "mr"
    return "ct" if np.percentile(voxels, 1.0) < -500 else "mr"


def hounsfield_to_unit(hounsfield):
    """CT voxels in Hounsfield units (array of any shape) -> float32 array in [0, 1] through
    :data:`CT_KNOTS_HU`. The one CT mapping: the engine and the trainer's CT rendering use it."""
    knots_hu, values = zip(*CT_KNOTS_HU)
    return np.interp(np.asarray(hounsfield, dtype=np.float32), knots_hu, values).astype(np.float32)


def normalise(voxels, modality="auto"):
    """Return ``(normalised float32 array in [0, 1], modality used)``.

    ``modality`` is 'auto', 'mr' or 'ct'; 'auto' calls :func:`detect_modality`.
    """
    if modality not in MODALITIES:
        raise ValueError("modality must be one of %s, not %r" % (", ".join(MODALITIES), modality))
    voxels = np.asarray(voxels, dtype=np.float32)
    if modality == "auto":
        modality = detect_modality(voxels)
    if modality == "ct":
        return hounsfield_to_unit(voxels), modality
    low, high = np.percentile(voxels, MR_PERCENTILES)
    if high <= low:  # mostly-constant image: fall back to the full range
        low, high = float(voxels.min()), float(voxels.max())
    scaled = (voxels - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32), modality


def normalised_image(image, modality="auto"):
    """``(float32 SimpleITK image in [0, 1] on ``image``'s grid, modality used)``; see :func:`normalise`."""
    voxels, used = normalise(sitk.GetArrayViewFromImage(image), modality)
    normalised = sitk.GetImageFromArray(voxels)
    normalised.CopyInformation(image)
    return normalised, used
