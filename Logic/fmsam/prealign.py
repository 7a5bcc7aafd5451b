"""Affine pre-alignment with SimpleITK: moments initialisation, rigid, then affine.

The result is an ITK transform in LPS millimetres that maps fixed points to moving points (the
resampling direction), so ``sitk.Resample(moving, fixed, transform)`` aligns moving to fixed.

Thin stacks (cardiac short-axis stacks of 2-6 slices 12-23 mm thick at 0.7 mm in plane): ITK's
registration pyramid shrinks every axis by the same factor and smooths with a recursive Gaussian that
needs at least four voxels along every axis, so such stacks made it fail. When an image has too few
voxels along some axis for the pyramid (:func:`fits_pyramid`), each level is run on images this module
shrinks itself, per axis (:func:`level_image`): thin axes are not shrunk, and an axis with fewer than
four voxels is resampled to four over the same extent. Images that fit (every brain here) take ITK's
own pyramid, exactly as before.

Whatever the path, the result is never worse than leaving the images where they are: the optimised
affine is compared with the identity and with the moments-centred translation (a refined affine with
the identity and the one it started from) by the normalised mutual information on the fixed grid
(:func:`alignment_score`), and the best is returned. With ``both_ways`` (accurate mode, and fast mode
when the moving image shows much less than the fixed one: :func:`moving_shows_much_less`), the same
alignment also runs the other way round (fixed onto moving) and its inverse is one more candidate:
one direction can fail where the other does not. A skull-stripped template moving onto a head with
its skull is such a case: the affine's Dice was 0.06-0.19 on 4 of 10 selection pairs that way,
0.54-0.56 the other way round, and the score picked the right one on the 6 pairs checked
(docs/benchmarks.md, "Subject-to-template pairs"). It doubles the affine's time (about 0.5 s more on
a 2 mm head pair), which fast mode's 5-second budget does not have room for on every machine. On thin
stacks the best is then refined at full resolution (:data:`THIN_FINE_LEVELS`) and the refinement
kept only when it scores higher.
"""
import numpy as np
import SimpleITK as sitk

#: Seed for the metric's random sampling: the same inputs always give the same transform.
SAMPLING_SEED = 20250510


#: Fewest voxels along an axis that ITK's recursive Gaussian smoothing (in the registration's
#: pyramid) accepts.
MIN_VOXELS = 4


def _registration(levels, iterations, sampling):
    """A registration over pyramid ``levels`` (shrink factors; smoothing sigma half of each, in voxels).

    One ITK thread, set on this object only (not process-wide, which would slow every other user of
    ITK in the process, Slicer's modules for one)."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)
    method.SetNumberOfWorkUnits(1)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    # Image gradients by central differences at the sampled points only, instead of a gradient
    # image of both whole images at every level: the affine took 1.8 s instead of 1.1 s, and on
    # 30 IXI pairs its Dice was 0.467 instead of 0.473 (docs/benchmarks.md, "Speed").
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetShrinkFactorsPerLevel(list(levels))
    method.SetSmoothingSigmasPerLevel([level / 2.0 for level in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


#: Pyramid levels (shrink factors; smoothing sigmas are half of them, in voxels) of each stage.
RIGID_LEVELS = AFFINE_LEVELS = (4, 2)
#: Levels of the refinement of an existing affine (``initial``), e.g. after contrast matching.
REFINE_LEVELS = (2,)
#: A last level for stacks too thin for ITK's pyramid (:func:`fits_pyramid`), run on the best of the
#: candidates and kept when it scores higher: the in-plane resolution (about 0.7 mm on cardiac stacks)
#: is where such stacks hold their detail, and the coarse levels see little of it. On the 16 pairs
#: of the cardiac selection patients it raised the fast-mode NMI on 6 (+0.0001 to +0.012), lowered it
#: on 2 (-0.0005, -0.0003) and left 8 as they were (docs/benchmarks.md, issue 14). Heads fit the
#: pyramid and never take it (for them a full-resolution level cost 3x the time and lowered Dice).
THIN_FINE_LEVELS = (1,)


def affine_prealign(fixed, moving, iterations=60, sampling=0.10, progress=None, initial=None, shrunk=1,
                    both_ways=False):
    """Affinely register ``moving`` to ``fixed`` (both normalised float32 SimpleITK images).

    ``initial``: an affine transform to refine (levels ``REFINE_LEVELS``, no rigid stage) instead of
    starting from the images' moments. ``shrunk``: the factor :func:`affine_inputs` block-averaged
    both images by (the pyramid's levels are divided by it). ``both_ways`` (without ``initial``):
    also align ``fixed`` onto ``moving`` and make the inverse a candidate.
    Returns an ``sitk.AffineTransform`` (fixed LPS point -> moving LPS point). ``progress(fraction)``
    is called every optimiser iteration; when it raises (e.g. :class:`fmsam.Cancelled`) the
    optimiser stops at that iteration and the exception is raised again here. Runs on one ITK
    thread: the multi-threaded metric adds partial sums in varying order, and the transform then
    differed in the last bits from run to run (outputs were not reproducible byte for byte).
    """
    if initial is None:
        thin = not (fits_pyramid(fixed, AFFINE_LEVELS) and fits_pyramid(moving, AFFINE_LEVELS))
        levels = ((len(RIGID_LEVELS) + len(AFFINE_LEVELS)) * (2 if both_ways else 1)
                  + (len(THIN_FINE_LEVELS) if thin else 0))
        tracker = _Progress(progress, iterations * levels)
        affine, centred = _rigid_then_affine(fixed, moving, iterations, sampling, tracker, shrunk)
        candidates = [affine, centred, sitk.AffineTransform(3)]
        if both_ways:
            backward, _ = _rigid_then_affine(moving, fixed, iterations, sampling, tracker, shrunk)
            try:
                candidates.insert(1, sitk.AffineTransform(backward.GetInverse()))
            except RuntimeError:  # a singular matrix has no inverse: no such candidate
                pass
        best = best_alignment(fixed, moving, candidates)
        if not thin:
            return best
        # Thin stacks: one more level at full resolution, kept only when it scores higher.
        refined = sitk.AffineTransform(best)
        _run_stage(refined, THIN_FINE_LEVELS, fixed, moving, iterations, sampling, tracker)
        return best_alignment(fixed, moving, [best, refined])
    else:
        affine = sitk.AffineTransform(initial)
        tracker = _Progress(progress, iterations * len(REFINE_LEVELS))
        _run_stage(affine, _shrunk_levels(REFINE_LEVELS, shrunk), fixed, moving, iterations, sampling, tracker)
        candidates = [affine, sitk.AffineTransform(initial), sitk.AffineTransform(3)]
    return best_alignment(fixed, moving, candidates)


def best_alignment(fixed, moving, candidates):
    """The candidate transform with the highest :func:`alignment_score` (the first on a tie), as an
    ``sitk.AffineTransform``."""
    scores = [alignment_score(fixed, moving, candidate) for candidate in candidates]
    return sitk.AffineTransform(candidates[int(np.argmax(scores))])


def fits_pyramid(image, levels):
    """True when ITK's own pyramid can shrink ``image`` by every factor in ``levels`` and still
    leave at least :data:`MIN_VOXELS` voxels along every axis."""
    return all(size // level >= MIN_VOXELS for size in image.GetSize() for level in levels)


def level_image(image, shrink):
    """``image`` for the pyramid level ``shrink``, shrunk per axis by block averages: by ``shrink``
    along axes that keep at least :data:`MIN_VOXELS` voxels, less (down to 1) along shorter ones; an
    axis left with fewer than :data:`MIN_VOXELS` voxels is then resampled (linear) to that many over
    the same physical extent (the buffer's, half a voxel beyond the first and last centres). Same
    direction, LPS frame; only voxel size, count and origin change."""
    size = image.GetSize()
    factors = [int(max(1, min(shrink, n // MIN_VOXELS))) for n in size]
    shrunk = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    size = shrunk.GetSize()
    if min(size) >= MIN_VOXELS:
        return shrunk
    counts = [max(n, MIN_VOXELS) for n in size]
    spacing = [sp * n / m for sp, n, m in zip(shrunk.GetSpacing(), size, counts)]
    # First new centre, in old voxel-index units: the buffer starts at index -0.5.
    first_index = [-0.5 + n / (2.0 * m) for n, m in zip(size, counts)]
    reference = sitk.Image(counts, sitk.sitkFloat32)
    reference.SetDirection(shrunk.GetDirection())
    reference.SetSpacing(spacing)
    reference.SetOrigin(shrunk.TransformContinuousIndexToPhysicalPoint(first_index))
    return sitk.Resample(shrunk, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


#: Most voxels an image the affine is estimated on may have before both images are block-averaged by
#: 2 (and the pyramid's shrink factors divided by 2, so the levels keep their physical scale).
AFFINE_MAX_VOXELS = 600_000
#: Images with an axis shorter than this are never block-averaged (thin stacks keep their path).
AFFINE_MIN_AXIS = 32


def affine_inputs(fixed, moving, max_voxels=AFFINE_MAX_VOXELS):
    """``(fixed, moving, factor)``: both images block-averaged (``sitk.BinShrink``, same physical
    extent and frame) by ``factor``, a power of 2, until neither holds more than ``max_voxels``
    voxels or one has an axis shorter than :data:`AFFINE_MIN_AXIS`; ``factor`` 1: unchanged. Pass
    ``factor`` to :func:`affine_prealign` as ``shrunk``. The pyramid's Gaussian smoothing of the
    whole images at every level of every stage cost most of the affine's time: a 2 mm head's affine
    took 1.0 s, a 1 mm head's 51 s; block-averaged once, the same levels run on images 8 (64) times
    smaller."""
    factor = 1
    while max(np.prod(image.GetSize()) for image in (fixed, moving)) > max_voxels and \
            min(min(image.GetSize()) for image in (fixed, moving)) >= AFFINE_MIN_AXIS:
        fixed, moving = sitk.BinShrink(fixed, [2] * 3), sitk.BinShrink(moving, [2] * 3)
        factor *= 2
    return fixed, moving, factor


def _shrunk_levels(levels, shrunk):
    """Pyramid shrink factors for images already block-averaged by ``shrunk``: each divided by it
    (at least 1), repeated 1s merged."""
    scaled = [max(1, level // shrunk) for level in levels]
    return tuple(level for n, level in enumerate(scaled) if n == 0 or level != scaled[n - 1] or level > 1)


#: Fixed-image voxels (normalised intensity) above this count as foreground for :func:`alignment_score`.
FOREGROUND = 0.05


def score_grid(fixed):
    """Every second voxel of ``fixed`` along each axis with at least 2 * :data:`MIN_VOXELS` voxels
    (thin axes are kept whole): ``(empty reference image on that grid, fixed voxels there (k, j, i))``."""
    strides = [2 if n >= 2 * MIN_VOXELS else 1 for n in fixed.GetSize()]
    reference = sitk.Image([(n + s - 1) // s for n, s in zip(fixed.GetSize(), strides)], sitk.sitkFloat32)
    reference.SetDirection(fixed.GetDirection())
    reference.SetOrigin(fixed.GetOrigin())
    reference.SetSpacing([sp * s for sp, s in zip(fixed.GetSpacing(), strides)])
    pick = tuple(slice(None, None, s) for s in strides[::-1])
    return reference, sitk.GetArrayViewFromImage(fixed)[pick]


def foreground_volume(image):
    """Volume (mm^3) of the voxels of a normalised image above :data:`FOREGROUND`."""
    return float((sitk.GetArrayViewFromImage(image) > FOREGROUND).sum()) * float(np.prod(image.GetSpacing()))


#: The moving image shows much less than the fixed one when its foreground volume is below this
#: fraction of the fixed image's (:func:`moving_shows_much_less`). Chosen on selection pairs: a
#: skull-stripped brain moving onto a head with its skull 0.32-0.43 (the 10 pairs of the stripped
#: template set with the template moving); every other pair 0.55 or more (30 IXI subject pairs
#: 0.74-1.33, the unstripped template set 0.76-1.32, 16 cardiac selection pairs 0.55-3.84). No pair
#: of the report sets is below it (abdomen 0.92-1.10, OASIS 0.94-1.07, cardiac 0.55-1.77), so their
#: fast-mode figures are unchanged.
SMALLER_MOVING_RATIO = 0.5


def moving_shows_much_less(fixed, moving):
    """True when ``moving``'s foreground volume is below :data:`SMALLER_MOVING_RATIO` times
    ``fixed``'s (both normalised, as the affine sees them; before contrast matching): a brain alone
    moving onto a whole head, a part onto the whole. Aligning the small onto the large is the
    direction seen to fail (the optimiser can settle on another bright structure of the fixed image);
    the large onto the small did not, which is why :func:`affine_prealign` is then asked to align
    both ways. It counts bright voxels, not anatomy: a fixed image with a bright background, or a
    slab of a few slices moving, meets it too, and costs the second direction's time there."""
    return foreground_volume(moving) < SMALLER_MOVING_RATIO * foreground_volume(fixed)


def foregrounds_comparable(fixed, moving):
    """True when neither image's foreground volume is below :data:`SMALLER_MOVING_RATIO` times the
    other's (both normalised): the images show about as much. Fast mode iterates the network only
    then (:func:`fmsam.inference.iterated_fields`): where one image shows much more (a head with its
    skull against a skull-stripped template), each further pass chases content the other image does
    not have (on the stripped template selection set two plain forward passes lost 0.026 Dice on
    every pair; one symmetric pass there, as before)."""
    return not moving_shows_much_less(fixed, moving) and not moving_shows_much_less(moving, fixed)


def alignment_score(fixed, moving, transform):
    """Normalised mutual information (1 to 2) of ``fixed`` and ``moving`` seen through ``transform``
    (fixed LPS point -> moving LPS point), over the fixed image's foreground on :func:`score_grid`.
    Both images normalised to [0, 1]; moving voxels outside its buffer count as 0, so a transform
    that loses the overlap scores low."""
    from .quality import normalised_mutual_information

    reference, fixed_values = score_grid(fixed)
    moving_values = sitk.GetArrayFromImage(  # a copy: a view would outlive the resampled image
        sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = fixed_values > FOREGROUND
    return normalised_mutual_information(fixed_values[inside], moving_values[inside])


class _Progress:
    """Forwards optimiser iterations as a fraction of the worst case (every level runs to the
    iteration limit), and turns any exception the callback raises (:class:`Cancelled` or its own
    error) into a stopped optimiser and raises it again after ``Execute``: SimpleITK does not
    propagate exceptions out of its commands (it reports a generic error of its own)."""

    def __init__(self, callback, total_iterations):
        self.callback, self.total = callback, float(total_iterations)
        self.done, self.cancelled = 0, None

    def watch(self, method):
        if self.callback is not None:
            method.AddCommand(sitk.sitkIterationEvent, lambda: self._iteration(method))

    def _iteration(self, method):
        self.done += 1
        if self.cancelled is not None:
            # StopRegistration ends the current resolution level only; stop each later one at once.
            method.StopRegistration()
            return
        try:
            self.callback(min(self.done / self.total, 0.99))
        except BaseException as raised:  # Cancelled, or the callback's own error: raised as itself
            self.cancelled = raised
            method.StopRegistration()

    def execute(self, method, fixed, moving):
        self.watch(method)
        method.Execute(fixed, moving)
        if self.cancelled is not None:
            raise self.cancelled


def _run_stage(transform, levels, fixed, moving, iterations, sampling, progress):
    """Optimise ``transform`` in place over pyramid ``levels``: ITK's pyramid when both images fit
    it, else one single-level run per level on :func:`level_image` images.

    When ITK gives up on a level (its metric raises when the images stop overlapping, which a
    pair far apart or a 2-slice stack can cause), the transform goes back to what it was before
    that level and the stage ends there: the candidates of :func:`best_alignment` still decide."""
    if fits_pyramid(fixed, levels) and fits_pyramid(moving, levels):
        runs = [(_registration(levels, iterations, sampling), fixed, moving)]
    else:
        runs = []
        for level in levels:
            method = _registration((1,), iterations, sampling)
            method.SetSmoothingSigmasPerLevel([0.0])
            runs.append((method, level_image(fixed, level), level_image(moving, level)))
    for method, level_fixed, level_moving in runs:
        before = transform.GetParameters()
        method.SetInitialTransform(transform, inPlace=True)
        try:
            progress.execute(method, level_fixed, level_moving)
        except RuntimeError:
            if progress.cancelled is not None:  # ITK's error while the callback stopped it: the
                raise progress.cancelled        # callback's own exception (Cancelled or not)
            transform.SetParameters(before)   # ITK's: it gave up on this level
            return


def _rigid_then_affine(fixed, moving, iterations, sampling, progress, shrunk=1):
    """``(optimised affine, moments-centred translation it started from)``."""
    initializer = sitk.CenteredTransformInitializerFilter()
    initializer.SetNumberOfThreads(1)
    initializer.MomentsOn()
    rigid = sitk.VersorRigid3DTransform(initializer.Execute(fixed, moving, sitk.VersorRigid3DTransform()))
    centred = sitk.AffineTransform(3)
    centred.SetCenter(rigid.GetCenter())
    centred.SetTranslation(rigid.GetTranslation())
    _run_stage(rigid, _shrunk_levels(RIGID_LEVELS, shrunk), fixed, moving, iterations, sampling, progress)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    # No full-resolution level: on 30 IXI validation pairs it cost 3x the time and lowered the
    # affine Dice (0.436 -> 0.460 without it on pairs 0-5, 0.436 -> 0.466 on pairs 6-17), and
    # 60 iterations at 10 % sampling gave the same Dice as 100 at 15 % (docs/benchmarks.md).
    _run_stage(affine, _shrunk_levels(AFFINE_LEVELS, shrunk), fixed, moving, iterations, sampling, progress)
    return affine, centred


def identity_affine():
    """The transform used when pre-alignment is switched off."""
    return sitk.AffineTransform(3)
