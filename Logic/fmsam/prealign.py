"""Affine pre-alignment with SimpleITK: moments initialisation, rigid, then affine.

The result is an ITK transform in LPS millimetres that maps fixed points to moving points (the
resampling direction), so ``sitk.Resample(moving, fixed, transform)`` aligns moving to fixed.
"""
import SimpleITK as sitk

#: Seed for the metric's random sampling: the same inputs always give the same transform.
SAMPLING_SEED = 20250510


def _registration(levels, iterations, sampling):
    """A registration over pyramid ``levels`` (shrink factors; smoothing sigma half of each, in voxels)."""
    method = sitk.ImageRegistrationMethod()
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


def affine_prealign(fixed, moving, iterations=60, sampling=0.10, progress=None, initial=None):
    """Affinely register ``moving`` to ``fixed`` (both normalised float32 SimpleITK images).

    ``initial``: an affine transform to refine (levels ``REFINE_LEVELS``, no rigid stage) instead of
    starting from the images' moments.
    Returns an ``sitk.AffineTransform`` (fixed LPS point -> moving LPS point). ``progress(fraction)``
    is called every optimiser iteration; when it raises (e.g. :class:`fmsam.Cancelled`) the
    optimiser stops at that iteration and the exception is raised again here. Runs on one ITK
    thread: the multi-threaded metric adds partial sums in varying order, and the transform then
    differed in the last bits from run to run (outputs were not reproducible byte for byte).
    """
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        if initial is None:
            tracker = _Progress(progress, iterations * (len(RIGID_LEVELS) + len(AFFINE_LEVELS)))
            return _rigid_then_affine(fixed, moving, iterations, sampling, tracker)
        affine = sitk.AffineTransform(initial)
        tracker = _Progress(progress, iterations * len(REFINE_LEVELS))
        _run_stage(affine, REFINE_LEVELS, fixed, moving, iterations, sampling, tracker)
        return affine
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


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
    method = _registration(levels, iterations, sampling)
    method.SetInitialTransform(transform, inPlace=True)
    progress.execute(method, fixed, moving)


def _rigid_then_affine(fixed, moving, iterations, sampling, progress):
    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.VersorRigid3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    _run_stage(rigid, RIGID_LEVELS, fixed, moving, iterations, sampling, progress)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    # No full-resolution level: on 30 IXI validation pairs it cost 3x the time and lowered the
    # affine Dice (0.436 -> 0.460 without it on pairs 0-5, 0.436 -> 0.466 on pairs 6-17), and
    # 60 iterations at 10 % sampling gave the same Dice as 100 at 15 % (docs/benchmarks.md).
    _run_stage(affine, AFFINE_LEVELS, fixed, moving, iterations, sampling, progress)
    return affine


def identity_affine():
    """The transform used when pre-alignment is switched off."""
    return sitk.AffineTransform(3)
