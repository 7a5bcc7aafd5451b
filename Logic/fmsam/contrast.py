"""Contrast matching: give the moving image the fixed image's contrast before the network sees it.

The bundled model learned T1-to-T1 registration with local correlation. When the moving image has
another contrast (T2-like inverted tissue intensities, a different gamma), the network and the
instance optimisation pull structures the wrong way. Once the pair is roughly aligned (affine), the
joint histogram says which fixed intensity each moving intensity usually sits on; mapping every
moving intensity to that conditional mean gives the moving image the fixed image's contrast. The
mapping is any function of intensity (not only monotone), so a dark background kept dark next to
inverted tissue is handled. For a same-contrast pair the mapping is close to the identity.

Used by :func:`fmsam.pipeline.register` after the affine pre-alignment: when the contrasts differ,
the affine is refined on the matched moving image and the network sees it; instance optimisation
then compares the moving image in its own contrast with a contrast-independent similarity (squared
local NCC); the warped output is always the original moving image.
"""
import dataclasses

import numpy as np
import SimpleITK as sitk

#: 'auto' matches contrast when that raises the images' correlation (every second voxel, after the
#: affine) by at least this much. Measured with this version's affine (Testing/Benchmarks/
#: label_free_checks.py --gains, docs/benchmarks.md): same-contrast pairs (30 IXI, 10 thick-slice
#: IXI, OASIS both ways) -0.025 to +0.012; gamma-changed +0.020 to +0.088; inverted +0.23 to +0.32.
#: The threshold sits in the gap, a little below its middle because the costs are lopsided:
#: matching a same-contrast pair changed its Dice by about -0.002, leaving a gamma pair unmatched
#: cost it 0.09 on average (0.434 against 0.526).
MIN_CORRELATION_GAIN = 0.015

#: Intensity bins of the moving image (inputs are normalised to [0, 1]).
BINS = 64
#: Bins with fewer voxels than this take their value from their neighbours.
MIN_COUNT = 20


def intensity_mapping(fixed, moving_on_fixed, bins=BINS):
    """``(bin centres, mapped value per bin)``: mean fixed intensity over the voxels whose moving
    intensity falls in each bin. ``fixed``/``moving_on_fixed``: arrays of the same shape, values in
    [0, 1], the moving image already resampled onto the fixed grid (affine or better)."""
    fixed = np.asarray(fixed, dtype=np.float64).ravel()
    moving = np.clip(np.asarray(moving_on_fixed, dtype=np.float64).ravel(), 0.0, 1.0)
    if fixed.shape != moving.shape:
        raise ValueError("fixed and moving must have the same shape, not %s and %s"
                         % (fixed.shape, moving.shape))
    index = np.minimum((moving * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    sums = np.bincount(index, weights=fixed, minlength=bins)
    centres = (np.arange(bins) + 0.5) / bins
    filled = counts >= MIN_COUNT
    if filled.sum() < 2:
        return centres, centres.copy()  # too few voxels to say anything: leave contrast alone
    means = sums[filled] / counts[filled]
    return centres, np.interp(centres, centres[filled], means)


def contrast_lookup(fixed, moving_on_fixed, levels=1025):
    """The whole mapping as a lookup table ``(moving intensities, matched intensities)`` over [0, 1].

    The conditional means put tissues in the fixed image's order but squeeze them towards the
    overall mean (misaligned voxels average bright and dark), so the mapped intensities are then
    histogram-matched to the fixed image, which restores its spread without changing the order.
    A lookup (rather than matching every voxel) applies to an image of any size in one pass.
    """
    centres, means = intensity_mapping(fixed, moving_on_fixed)
    ordered = np.sort(np.interp(np.clip(np.asarray(moving_on_fixed, dtype=np.float64).ravel(), 0.0, 1.0),
                                centres, means))
    target = np.sort(np.asarray(fixed, dtype=np.float64).ravel())
    grid = np.linspace(0.0, 1.0, levels)
    # Rank of each level's mapped value among the mapped voxels; tied voxels (a uniform tissue, the
    # background) take their middle rank, so they land in the middle of their share of the fixed
    # image's intensities.
    mapped = np.interp(grid, centres, means)
    middle = (np.searchsorted(ordered, mapped, side="left") + np.searchsorted(ordered, mapped, side="right")) / 2.0
    ranks = middle / max(1, len(ordered))
    return grid, np.interp(np.clip(ranks, 0.0, 1.0), np.linspace(0.0, 1.0, len(target)), target)


def apply_lookup(lookup, voxels):
    """Voxels (values in [0, 1], any shape) through a :func:`contrast_lookup` table; float32."""
    grid, values = lookup
    return np.interp(np.clip(np.asarray(voxels, dtype=np.float64), 0.0, 1.0), grid, values).astype(np.float32)


def contrast_decision(fixed, moving_on_fixed):
    """``(lookup, correlation gain)`` for two aligned arrays of one shape: the gain is how much the
    mapping raises the images' correlation (near 0: same contrast)."""
    lookup = contrast_lookup(fixed, moving_on_fixed)
    gain = _correlation(fixed, apply_lookup(lookup, moving_on_fixed)) - _correlation(fixed, moving_on_fixed)
    return lookup, gain


def _correlation(first, second):
    first = np.asarray(first, dtype=np.float64).ravel()
    second = np.asarray(second, dtype=np.float64).ravel()
    if first.std() == 0 or second.std() == 0:
        return 0.0
    return float(np.corrcoef(first, second)[0, 1])


#: Voxels the contrast decision looks at: every second one along each axis (as fmsam.quality does).
DECISION_SAMPLING = (slice(None, None, 2),) * 3


@dataclasses.dataclass
class ContrastChoice:
    """Whether the moving image gets the fixed image's contrast, and the image the network sees."""

    applied: bool
    correlation_gain: float
    moving_for_network: sitk.Image   # normalised moving image, in the fixed image's contrast if applied

    def report(self):
        return {"applied": bool(self.applied), "correlation_gain": round(self.correlation_gain, 4)}


def choose_contrast(fixed, moving, moving_on_fixed, mode="auto"):
    """:class:`ContrastChoice` for normalised SimpleITK images: ``fixed``, ``moving`` (its own grid)
    and ``moving_on_fixed`` (``moving`` affinely resampled onto ``fixed``'s grid, which the decision
    compares). ``mode``: 'auto' (match when the correlation gain reaches
    :data:`MIN_CORRELATION_GAIN`), 'on' or 'off'."""
    lookup, gain = contrast_decision(*(sitk.GetArrayViewFromImage(image)[DECISION_SAMPLING]
                                       for image in (fixed, moving_on_fixed)))
    applied = mode == "on" or (mode == "auto" and gain >= MIN_CORRELATION_GAIN)
    if not applied:
        return ContrastChoice(False, gain, moving)
    matched = sitk.GetImageFromArray(apply_lookup(lookup, sitk.GetArrayViewFromImage(moving)))
    matched.CopyInformation(moving)
    return ContrastChoice(True, gain, matched)
