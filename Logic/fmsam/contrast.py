"""Contrast matching: give the moving image the fixed image's contrast before the network sees it.

The bundled model learned T1-to-T1 registration with local correlation. When the moving image has
another contrast (T2-like inverted tissue intensities, a different gamma), the network and the
instance optimisation pull structures the wrong way. Once the pair is roughly aligned (affine), the
joint histogram says which fixed intensity each moving intensity usually sits on; mapping every
moving intensity to that conditional mean gives the moving image the fixed image's contrast. The
mapping is any function of intensity (not only monotone), so a dark background kept dark next to
inverted tissue is handled. For a same-contrast pair the mapping is close to the identity.

Used by :func:`fmsam.pipeline.register` on the network grid, for the network and the instance
optimisation; the warped output is always the original moving image.
"""
import numpy as np

CONTRAST_MATCHING = ("auto", "on", "off")
#: 'auto' matches contrast when that raises the images' correlation (on the network grid, after the
#: affine) by at least this much. Measured with Testing/Benchmarks/contrast_gain_check.py
#: (docs/benchmarks.md): same-contrast pairs (IXI, OASIS, thick-slice) -0.013 to +0.007,
#: gamma-changed +0.010 to +0.071, inverted +0.16 to +0.26. Matching a same-contrast pair anyway
#: changed fast-mode Dice by -0.0003 on 10 IXI pairs, so a borderline call costs little.
MIN_CORRELATION_GAIN = 0.01

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


def match_contrast(fixed, moving_on_fixed, moving=None):
    """The moving image with the fixed image's contrast, as a float32 array.

    ``fixed`` and ``moving_on_fixed`` (same shape) estimate the mapping; it is applied to ``moving``
    (any shape; default ``moving_on_fixed``). The conditional means put tissues in the fixed image's
    order but squeeze them towards the overall mean (misaligned voxels average bright and dark), so
    the mapped image is then histogram-matched to the fixed image, which restores its intensity
    spread without changing the order.
    """
    centres, mapped = intensity_mapping(fixed, moving_on_fixed)
    source = moving_on_fixed if moving is None else moving
    ordered = np.interp(np.clip(np.asarray(source, dtype=np.float64), 0.0, 1.0), centres, mapped)
    return histogram_matched(ordered, fixed).astype(np.float32)


def histogram_matched(values, reference):
    """``values`` mapped monotonically so their distribution is that of ``reference``; equal values
    stay equal (rank of the first of them)."""
    flat = values.ravel()
    ordered = np.sort(flat)
    ranks = np.searchsorted(ordered, flat, side="left") / max(1, len(ordered) - 1)
    target = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    matched = np.interp(ranks, np.linspace(0.0, 1.0, len(target)), target)
    return matched.reshape(np.shape(values))


def contrast_matched(fixed, moving_on_fixed):
    """``(moving with the fixed contrast, correlation gain)`` for two aligned arrays of one shape:
    the gain is how much the mapping raised the images' correlation (near 0: same contrast)."""
    matched = match_contrast(fixed, moving_on_fixed)
    before = _correlation(fixed, moving_on_fixed)
    after = _correlation(fixed, matched)
    return matched, after - before


def _correlation(first, second):
    first = np.asarray(first, dtype=np.float64).ravel()
    second = np.asarray(second, dtype=np.float64).ravel()
    if first.std() == 0 or second.std() == 0:
        return 0.0
    return float(np.corrcoef(first, second)[0, 1])
