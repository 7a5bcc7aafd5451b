"""The registration pipeline: two volumes in, the fixed-to-moving mapping and its inverse out.

:func:`register` runs the stages of :data:`fmsam.options.STAGES`: read and check the inputs,
normalise their intensities in the training layout (prepare) -> affine pre-alignment and the
contrast choice (affine) -> the network, fast or accurate (network, instance_optimisation) -> the
mapping as an affine and a displacement field on the network grid, both directions (compose) ->
warp the moving image and labels, Dice (warp) -> Jacobian determinant on the fixed grid (jacobian).
"""
import concurrent.futures
import contextlib
import dataclasses
import sys
import threading
import time
import typing

import numpy as np
import SimpleITK as sitk

from . import __version__, fields
from .arguments import check_register_arguments
from .contrast import choose_contrast
from .errors import RegistrationError, error_line
from .geometry import reorient
from .imageio import load_label_map_on_grid, load_scalar_volume
from .intensity import normalised_image
from .jacobian import jacobian_statistics, transform_jacobian
from .metrics import dice_report
from .options import DEFAULT_SLICE_REFINEMENT
from .prealign import (affine_inputs, affine_prealign, foregrounds_comparable, identity_affine,
                       moving_shows_much_less)
from .quality import deformable_gain

#: Axis layout (DICOM orientation code) of the images the bundled model was trained on (IXI).
TRAINING_ORIENTATION = "PSR"


@dataclasses.dataclass
class RegistrationResult:
    """Everything a registration produced. Images are SimpleITK images on the fixed grid (LPS).

    The mapping fixed point -> moving point is ``affine(x + d(x))`` with ``d`` = ``deformation``
    (on the network grid, see :mod:`fmsam.fields`); its inverse uses ``inverse_deformation``."""

    fixed: sitk.Image                 # the fixed image as read (its grid is the result's grid)
    affine: sitk.Transform            # the affine part alone (fixed -> moving)
    deformation: fields.Deformation   # the deformable part, fixed frame, fixed -> moving
    inverse_deformation: fields.Deformation   # its inverse, same grid
    warped: sitk.Image                # the moving image resampled onto the fixed grid
    jacobian: sitk.Image              # float32 det(J) of the whole mapping on the fixed grid
    report: dict                      # the figures of report.json (JSON-ready)
    warped_labels: typing.Optional[sitk.Image] = None   # the moving labels resampled, or None

    @property
    def transform(self):
        """The mapping as a new ``sitk.CompositeTransform`` (LPS, fixed -> moving; resamples the
        moving image onto the fixed grid)."""
        return fields.registration_transform(self.affine, self.deformation)

    @property
    def inverse_transform(self):
        """The inverse mapping as a new ``sitk.CompositeTransform`` (LPS, moving -> fixed; resamples
        fixed-space images onto the moving grid, maps moving points to fixed points)."""
        return fields.inverse_registration_transform(self.affine, self.inverse_deformation)

    @property
    def field(self):
        """The mapping as a dense field on the fixed grid: (k, j, i, 3) float64 LPS mm, computed on
        each call (it takes memory the result itself does not: 200 MB for a 1 mm head)."""
        return fields.dense_field(self.transform, self.fixed)


class _Stages:
    """Times each stage and forwards progress as ``callback(stage, fraction_of_stage)``; within a
    stage the fraction never goes back (the affine refined after contrast matching counts again
    from 0)."""

    def __init__(self, callback):
        self.callback = callback
        self.seconds = {}
        self._stage, self._start, self._fraction = None, None, 0.0
        self.raised = None  # what the callback raised, told apart from the library's own errors

    def begin(self, stage):
        self.end()
        self._stage, self._start, self._fraction = stage, time.perf_counter(), 0.0
        self.update(0.0)

    def update(self, fraction):
        self._fraction = max(self._fraction, fraction)
        if self.callback is not None:
            try:
                self.callback(self._stage, self._fraction)
            except BaseException as raised:
                self.raised = raised
                raise

    def end(self):
        if self._stage is not None:
            self.seconds[self._stage] = round(time.perf_counter() - self._start, 3)
            self.update(1.0)
            self._stage = None


#: Similarity of instance optimisation when contrast matching was applied (the contrasts differ),
#: compared with the moving image in its own contrast: the squared local NCC does not depend on the
#: sign of the local intensity relation, so it does not rely on the global intensity mapping being
#: right everywhere (multiGradICON's choice). On the sample pair with the moving image inverted, 20
#: steps: Dice 0.574 with the signed LNCC on the matched image (before), 0.623 squared on the matched
#: image, 0.641 squared on the moving image's own contrast (docs/benchmarks.md, "Contrast matching").
IO_SIMILARITY_ACROSS_CONTRASTS = "squared_lncc"


def prealign_or_explain(stages, fixed, moving, initial=None, both_ways=False):
    """:func:`affine_prealign` of two normalised images (``both_ways`` passed on), block-averaged to
    at most :data:`fmsam.prealign.AFFINE_MAX_VOXELS` first (:func:`fmsam.prealign.affine_inputs`),
    progress to ``stages``, with SimpleITK's
    own failures (images it cannot align, e.g. ones that do not overlap) turned into a
    :class:`RegistrationError` that says what to do; the progress callback's exceptions pass
    through as themselves."""
    try:
        fixed, moving, shrunk = affine_inputs(fixed, moving)
        return affine_prealign(fixed, moving, progress=stages.update, initial=initial, shrunk=shrunk,
                               both_ways=both_ways)
    except RuntimeError as error:
        if error is stages.raised:
            raise
        raise RegistrationError("the affine pre-alignment failed on these images (%s); check that they "
                                "show the same anatomy, or register without it (--no-affine, "
                                "prealign=False)" % error_line(error)) from None


def weights_provenance(network):
    """``{"file", "sha256", "verified"}`` of the weights file a network was loaded from (all None or
    False for a network that did not come from :func:`fmsam.weights.load_model`)."""
    return dict(getattr(network, "fmsam_weights", None) or {"file": None, "sha256": None, "verified": False})


def check_finite_result(values, network, what="displacement field"):
    """Raise :class:`RegistrationError` unless every value of ``values`` (the field (k, j, i, 3) in
    mm, or the Jacobian determinant as written, float32) is finite: a NaN field would warp to an
    empty image and count no folding, an infinite determinant is not JSON."""
    finite = np.isfinite(values)
    if not finite.all():
        raise RegistrationError(
            "the registration produced a non-finite %s (%d of %d values NaN or infinite) with the "
            "weights %s; no result is returned or written"
            % (what, finite.size - int(finite.sum()), finite.size,
               weights_provenance(network)["file"] or "given"))


def non_finite_entries(report, prefix=""):
    """Keys (``"seconds.total"`` for nested ones) of the report's values that are NaN or infinite."""
    found = []
    items = report.items() if isinstance(report, dict) else enumerate(report)
    for key, value in items:
        name = "%s%s" % (prefix, key)
        if isinstance(value, (dict, list, tuple)):
            found += non_finite_entries(value, name + ".")
        elif isinstance(value, float) and not np.isfinite(value):
            found.append(name)
    return found


def loads_in_thread(model, weights):
    """Whether :func:`start_loading_model` loads the network in a thread: the bundled model, when no
    loaded ``model`` and no ``weights`` file is given."""
    return model is None and weights is None


def start_loading_model(model, weights, allow_unverified):
    """``(network options, a function returning the network)``. The bundled model is loaded in a
    thread (PyTorch's import takes about 1 s) while the images are prepared and aligned, which
    needs only the options (from the manifest): :func:`loads_in_thread`."""
    from .weights import bundled_config, load_model

    if model is not None:
        return model[1], lambda: model[0]
    if not loads_in_thread(model, weights):
        network, config = load_model(weights, "cpu", allow_unverified)
        return config, lambda: network
    loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmsam-load")
    loading = loader.submit(load_model, None, "cpu")
    loader.shutdown(wait=False)
    return bundled_config(), lambda: loading.result()[0]


def round_trip_report(forward, inverse, grid_reference):
    """``{"mean", "max"}`` in mm of how far the inverse field followed by the forward one leaves a
    point of the network grid (:func:`fmsam.inference.round_trip_error`)."""
    from .inference import round_trip_error

    error = np.linalg.norm(fields.normalised_to_lps(round_trip_error(forward, inverse), grid_reference), axis=-1)
    return {"mean": round(float(error.mean()), 4), "max": round(float(error.max()), 4)}


@dataclasses.dataclass
class _Inputs:
    """The images of one registration as read (LPS), and their normalised copies in the training
    layout (what the affine and the network see)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: typing.Optional[sitk.Image]
    moving_labels: typing.Optional[sitk.Image]
    fixed_normalised: sitk.Image = None
    moving_normalised: sitk.Image = None
    modalities: tuple = ("auto", "auto")


def read_inputs(fixed, moving, fixed_labels, moving_labels):
    """Stage 'prepare', first part: the images and label maps as read (see :func:`register`)."""
    inputs = _Inputs(load_scalar_volume(fixed, "fixed image"), load_scalar_volume(moving, "moving image"),
                     None, None)
    if fixed_labels is not None:
        inputs.fixed_labels = load_label_map_on_grid(fixed_labels, inputs.fixed, fixed, "fixed")
    if moving_labels is not None:
        inputs.moving_labels = load_label_map_on_grid(moving_labels, inputs.moving, moving, "moving")
    return inputs


def normalise_inputs(inputs, modality, layout):
    """Stage 'prepare', second part: both images brought to the axis layout of the training images
    by a pure permutation or flip of their grids (no resampling: the network learned anatomy in
    that layout, and the result no longer depends on how a reader stored the voxels, as Slicer flips
    some NIfTI axes), and normalised (:mod:`fmsam.intensity`; ``modality`` one for both or a pair)."""
    modalities = (modality, modality) if isinstance(modality, str) else modality
    inputs.fixed_normalised, fixed_modality = normalised_image(reorient(inputs.fixed, layout), modalities[0])
    inputs.moving_normalised, moving_modality = normalised_image(reorient(inputs.moving, layout), modalities[1])
    inputs.modalities = (fixed_modality, moving_modality)


#: Accurate mode (instance optimisation) aligns both ways (:func:`fmsam.prealign.affine_prealign`'s
#: ``both_ways``): a direction that fails is caught by the other (a skull-stripped template against a
#: head with its skull), for about 0.5 s that fast mode's 5-second budget does not have on every
#: machine (fast: 3.37 -> 3.77 s on an idle 2-core machine, 4.1 -> 4.8 s on the same machine busier
#: with page-cache reclaim; docs/benchmarks.md, "Subject-to-template pairs"). Fast mode aligns both
#: ways only when the moving image shows much less than the fixed one
#: (:func:`fmsam.prealign.moving_shows_much_less`), the case where one way was seen to fail.
BOTH_WAYS_FROM_IO_STEPS = 1


def aligns_both_ways(inputs, io_steps):
    """Whether the affine runs both ways: in accurate mode always, in fast mode when the moving
    image's foreground is much smaller than the fixed image's (normalised images of ``inputs``)."""
    return io_steps >= BOTH_WAYS_FROM_IO_STEPS or moving_shows_much_less(inputs.fixed_normalised,
                                                                         inputs.moving_normalised)


#: Python's thread switch interval (seconds) during the affine stage (default 0.005) while the
#: bundled model loads in a thread (PyTorch's import: about a second of Python holding the
#: interpreter lock). ITK's optimiser calls back into Python after every iteration (progress,
#: Cancel), and each call waited for the lock until the loading thread's interval ran out: on the
#: first 10 IXI pairs the affine stage took 0.98 s at the default interval and 0.81 s at this one
#: (the affine alone, with nothing loading, about 0.55 s; docs/benchmarks.md, "Speed and scale").
AFFINE_SWITCH_INTERVAL = 0.0002

_switching = {"lock": threading.Lock(), "depth": 0, "previous": None}


@contextlib.contextmanager
def quick_thread_switches(interval=AFFINE_SWITCH_INTERVAL):
    """Python's thread switch interval set to ``interval`` seconds inside the block (process-wide,
    as the interpreter has one). Blocks may overlap, in one thread or several (registrations run
    in threads): the first to enter saves the interval and the last to leave restores it."""
    with _switching["lock"]:
        if _switching["depth"] == 0:
            _switching["previous"] = sys.getswitchinterval()
            sys.setswitchinterval(interval)
        _switching["depth"] += 1
    try:
        yield
    finally:
        with _switching["lock"]:
            _switching["depth"] -= 1
            if _switching["depth"] == 0:
                sys.setswitchinterval(_switching["previous"])


def align(stages, inputs, prealign, contrast_matching, both_ways=False):
    """Stage 'affine': ``(affine, ContrastChoice)``; ``both_ways``: see
    :func:`fmsam.prealign.affine_prealign`. When the contrasts differ the moving image
    gets the fixed image's and the affine is refined on it (its fine level only, about 0.4 s):
    mutual information copes with other contrasts, but less well (on 10 gamma-changed pairs it
    aligned worse than on the originals); refining instead of starting again gave Dice on the gamma
    and inverted pairs within 0.002 of a full second run."""
    fixed, moving = inputs.fixed_normalised, inputs.moving_normalised
    affine = prealign_or_explain(stages, fixed, moving, both_ways=both_ways) if prealign else identity_affine()
    contrast = choose_contrast(fixed, moving, fields.resample(moving, fixed, affine), contrast_matching)
    if contrast.applied and prealign:
        affine = prealign_or_explain(stages, fixed, contrast.moving_for_network, initial=affine)
    return affine, contrast


def run_network(stages, network, config, inputs, affine, contrast, io_steps, device,
                slice_refinement=DEFAULT_SLICE_REFINEMENT):
    """Stages 'network' and 'instance_optimisation': ``(NetworkFields, device used, grid)``.
    Instance optimisation compares the moving image in its own contrast when the contrasts differ
    (a contrast-independent similarity), else the image the network saw. Fast mode (and accurate
    mode on a refined stack) makes the model's ``network_passes`` only when the two images show
    about as much (:func:`fmsam.prealign.foregrounds_comparable`), else one. A fixed image that is a
    stack of thick slices (:func:`fmsam.slice_refinement.planes_to_refine`) then has its slices
    refined in plane one by one, with the same similarity, when ``slice_refinement`` is 'auto';
    accurate mode runs fast mode's fields there instead of instance optimisation
    (:func:`fmsam.slice_refinement.instance_optimisation_steps`). The report's ``io_steps_run`` says
    how many steps ran."""
    from . import slice_refinement as refinement
    from .inference import choose_device, grid_for, network_fields, secant_strides

    fixed = inputs.fixed_normalised
    stack = refinement.planes_to_refine(fixed, slice_refinement)
    io_steps = refinement.instance_optimisation_steps(io_steps, stack)  # 0 on a refined stack: fast mode's fields
    if not io_steps and config.get("network_passes", 1) > 1 and not foregrounds_comparable(
            fixed, inputs.moving_normalised):
        config = dict(config, network_passes=1)
    grid = grid_for(fixed, config, accurate=bool(io_steps))
    strides = secant_strides(fixed.GetSpacing()[::-1], fields.network_grid(fixed, grid).GetSpacing()[::-1])
    similarity = IO_SIMILARITY_ACROSS_CONTRASTS if contrast.applied else "lncc"
    # Arrays, not views: a view would outlive the resampled image it shows.
    moving_on_fixed = sitk.GetArrayFromImage(fields.resample(contrast.moving_for_network, fixed, affine))
    io_moving = None
    if similarity == "squared_lncc":
        io_moving = sitk.GetArrayFromImage(fields.resample(inputs.moving_normalised, fixed, affine))
    computed, used_device = network_fields(
        network, config, choose_device(device), sitk.GetArrayViewFromImage(fixed), moving_on_fixed,
        grid, io_steps, similarity, io_moving,
        on_instance_optimisation=lambda: stages.begin("instance_optimisation"), progress=stages.update,
        strides=strides, slice_planes=stack)
    computed.report["io_steps_run"] = int(io_steps)
    return computed, used_device, grid


def compose(computed, inputs, grid, network):
    """Stage 'compose': the deformation and its inverse on the network grid (LPS mm), checked
    finite, and the inverse's round trip for the report."""
    fixed = inputs.fixed_normalised
    field_grid = fields.network_grid(fixed, grid)
    deformation, inverse = (fields.cover_fixed_voxels(fields.Deformation(
        field_grid, fields.normalised_to_lps(field, fixed)), fixed) for field in (computed.forward, computed.inverse))
    check_finite_result(deformation.displacement, network)
    check_finite_result(inverse.displacement, network, "inverse displacement field")
    return deformation, inverse, round_trip_report(computed.forward, computed.inverse, fixed)


def warp_and_compare(inputs, affine, transform):
    """Stage 'warp': ``(warped image, warped labels or None, report entries)``: the moving image and
    labels through ``transform`` onto the fixed grid, Dice when both label maps are given
    (:func:`fmsam.metrics.dice_report`), and the label-free check that the deformable step made the
    images more alike than the affine did (:func:`fmsam.quality.deformable_gain`)."""
    fixed = inputs.fixed
    warped = fields.resample(inputs.moving, fixed, transform)
    warped_labels, report = None, {}
    if inputs.moving_labels is not None:
        warped_labels = fields.resample(inputs.moving_labels, fixed, transform, nearest=True)
    if inputs.fixed_labels is not None and inputs.moving_labels is not None:
        through = {None: sitk.Transform(), "affine": affine}
        report.update(dice_report(inputs.fixed_labels, inputs.moving_labels, lambda which: warped_labels
                                  if which == "registration" else
                                  fields.resample(inputs.moving_labels, fixed, through[which], nearest=True)))
    report["mi_affine"], report["mi_registered"], warning = deformable_gain(
        fixed, fields.resample(inputs.moving, fixed, affine), warped)
    report["warnings"] = [warning] if warning else []
    if report.get("dice_labels") == 0:
        report["warnings"].append("the two label maps share no label (> 0): no Dice is reported")
    return warped, warped_labels, report


def jacobian_map(transform, fixed, network):
    """Stage 'jacobian': ``(float32 det J image on the fixed grid, its statistics)``; a determinant
    beyond float32 is refused."""
    determinant = transform_jacobian(transform, fixed)
    with np.errstate(over="ignore"):  # beyond float32: inf, refused here
        values = determinant.astype(np.float32)
    check_finite_result(values, network, "Jacobian determinant")
    return fields.image_on_grid(values, fixed), jacobian_statistics(determinant)


def register(fixed, moving, fixed_labels=None, moving_labels=None, prealign=True, io_steps=0,
             device="auto", weights=None, modality="auto", progress=None, model=None,
             contrast_matching="auto", allow_unverified=False,
             slice_refinement=DEFAULT_SLICE_REFINEMENT):
    """Register ``moving`` to ``fixed`` and return a :class:`RegistrationResult`.

    ``fixed``/``moving``: paths (NIfTI, NRRD, MHA) or SimpleITK images, any size, spacing,
    orientation and pixel type. ``fixed_labels``/``moving_labels``: optional label maps on their
    image's grid, for the Dice report and the warped label map. ``prealign``: affine pre-alignment
    on/off (bool). ``io_steps``: instance-optimisation steps, an int from 0 (fast mode, the network
    alone) to 2000 (accurate mode: :data:`fmsam.options.MODES`). ``device``: 'auto', 'cpu' or 'cuda'
    ('cuda' needs a usable GPU). ``weights``: a weights file (default: bundled model) whose SHA-256
    is verified against ``<file>.sha256``; a file without one is refused unless
    ``allow_unverified=True``. ``modality``: 'auto', 'mr' or 'ct' for both images, or a (fixed,
    moving) pair. ``contrast_matching``: give the moving image the fixed image's contrast before the
    network ('auto': when the contrasts differ; 'on'; 'off'), see :mod:`fmsam.contrast`.
    ``slice_refinement``: 'auto' gives each slice of a fixed image made of thick slices (cardiac
    short-axis stacks of 2 to 32 slices) its own in-plane correction after the network, in accurate
    mode in place of its instance optimisation; 'off' never (default
    :data:`fmsam.options.DEFAULT_SLICE_REFINEMENT`; :mod:`fmsam.slice_refinement`).
    ``progress(stage, fraction)``: called often; it may raise :class:`fmsam.errors.Cancelled` to
    stop, and any exception it raises reaches the caller as itself. ``model``: an already loaded
    ``(network, config)`` to reuse across calls (instead of ``weights``).

    Every argument is checked before any work (:mod:`fmsam.arguments`): a bad one raises
    :class:`InputError`, as do bad images and weights. :class:`RegistrationError`: the result is
    not finite (nothing is returned).
    """
    check_register_arguments(fixed, moving, fixed_labels, moving_labels, prealign, io_steps, device,
                             weights, modality, progress, model, contrast_matching, allow_unverified,
                             slice_refinement)
    stages, total_start = _Stages(progress), time.perf_counter()

    stages.begin("prepare")
    inputs = read_inputs(fixed, moving, fixed_labels, moving_labels)
    config, network_when_ready = start_loading_model(model, weights, allow_unverified)
    normalise_inputs(inputs, modality, config.get("orientation", TRAINING_ORIENTATION))
    stages.begin("affine")
    with quick_thread_switches() if loads_in_thread(model, weights) else contextlib.nullcontext():
        both_ways = prealign and aligns_both_ways(inputs, io_steps)
        affine, contrast = align(stages, inputs, prealign, contrast_matching, both_ways=both_ways)
    report = {"contrast_matching": contrast.report(), "affine_both_ways": bool(both_ways)}
    stages.begin("network")
    network = network_when_ready()
    computed, used_device, grid = run_network(stages, network, config, inputs, affine, contrast, io_steps, device,
                                              slice_refinement)
    report.update(computed.report)
    stages.begin("compose")
    deformation, inverse, report["inverse_round_trip_mm"] = compose(computed, inputs, grid, network)
    transform = fields.registration_transform(affine, deformation)
    stages.begin("warp")
    warped, warped_labels, compared = warp_and_compare(inputs, affine, transform)
    report.update(compared)
    stages.begin("jacobian")
    jacobian, statistics = jacobian_map(transform, inputs.fixed, network)
    stages.end()

    report.update(statistics)
    seconds = dict(stages.seconds, total=round(time.perf_counter() - total_start, 3))
    report.update({
        "seconds": seconds, "device": used_device.type, "requested_device": device,
        "prealign": bool(prealign), "io_steps": int(io_steps), "network_grid": list(grid),
        "modality": dict(zip(("fixed", "moving"), inputs.modalities)),
        "fixed_size": list(inputs.fixed.GetSize()), "fixed_spacing": list(inputs.fixed.GetSpacing()),
        "weights": weights_provenance(network), "fmsam_version": __version__,
    })
    if non_finite_entries(report):  # report.json is strict JSON
        raise RegistrationError("the registration's figures %s are not finite; no result is returned or "
                                "written" % ", ".join(non_finite_entries(report)))
    return RegistrationResult(fixed=inputs.fixed, affine=affine, deformation=deformation,
                              inverse_deformation=inverse, warped=warped, warped_labels=warped_labels,
                              jacobian=jacobian, report=report)
