"""The registration pipeline: two volumes in, one fixed-to-moving displacement field out.

Stages: read and check inputs -> normalise intensities -> affine pre-alignment -> network ->
(optional) instance optimisation -> compose affine and deformable parts into one LPS field on the
fixed grid -> warp moving image (and labels) -> Jacobian determinant and its statistics.
"""
import concurrent.futures
import dataclasses
import time
import typing

import numpy as np
import SimpleITK as sitk

from . import __version__, fields
from .arguments import check_register_arguments
from .contrast import MIN_CORRELATION_GAIN, apply_lookup, contrast_decision
from .errors import RegistrationError, error_line
from .imageio import load_label_map_on_grid, load_scalar_volume
from .intensity import normalise
from .jacobian import jacobian_determinant, jacobian_statistics
from .metrics import labels_in_both, mean_dice
from .prealign import affine_prealign, identity_affine
from .quality import deformable_gain

#: Axis layout (DICOM orientation code) of the images the bundled model was trained on (IXI).
TRAINING_ORIENTATION = "PSR"


@dataclasses.dataclass
class RegistrationResult:
    """Everything a registration produced. Images are SimpleITK images on the fixed grid (LPS)."""

    fixed: sitk.Image                 # the fixed image as read (its grid is the result's grid)
    field: np.ndarray                 # (k, j, i, 3) LPS millimetres, fixed point -> moving point
    affine: sitk.Transform            # the affine part alone (fixed -> moving)
    warped: sitk.Image                # the moving image resampled onto the fixed grid
    jacobian: sitk.Image              # float32 det(J) of the whole mapping
    report: dict                      # the figures of report.json (JSON-ready)
    warped_labels: typing.Optional[sitk.Image] = None   # the moving labels resampled, or None

    @property
    def transform(self):
        """The mapping as a new ``sitk.DisplacementFieldTransform`` (LPS, fixed -> moving)."""
        return fields.field_transform(self.field, self.fixed)

    @property
    def field_image(self):
        return fields.field_image(self.field, self.fixed)


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

#: Voxels the contrast decision looks at: every second one along each axis (as fmsam.quality does).
DECISION_SAMPLING = (slice(None, None, 2),) * 3


def normalised_image(image, modality):
    """``(float32 image in [0, 1] on the same grid, modality used)``; see :mod:`fmsam.intensity`."""
    voxels, used = normalise(sitk.GetArrayViewFromImage(image), modality)
    return fields.image_on_grid(voxels, image), used


def orientation_of(image):
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image, orientation):
    """The same voxels with axes permuted/flipped to ``orientation`` (no interpolation)."""
    return image if orientation_of(image) == orientation else sitk.DICOMOrient(image, orientation)


def back_to_grid(field, field_grid, fixed_image):
    """A field computed on the reoriented grid, returned to the fixed image's own voxel order."""
    if orientation_of(field_grid) == orientation_of(fixed_image):
        return field
    restored = sitk.DICOMOrient(fields.field_image(field, field_grid), orientation_of(fixed_image))
    return sitk.GetArrayFromImage(restored).astype(np.float64)


def prealign_or_explain(stages, fixed, moving, initial=None):
    """:func:`affine_prealign` of two normalised images (progress to ``stages``), with SimpleITK's
    own failures (images it cannot align, e.g. ones that do not overlap) turned into a
    :class:`RegistrationError` that says what to do; the progress callback's exceptions pass
    through as themselves."""
    try:
        return affine_prealign(fixed, moving, progress=stages.update, initial=initial)
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


def register(fixed, moving, fixed_labels=None, moving_labels=None, prealign=True, io_steps=0,
             device="auto", weights=None, modality="auto", progress=None, model=None,
             contrast_matching="auto", allow_unverified=False):
    """Register ``moving`` to ``fixed`` and return a :class:`RegistrationResult`.

    ``fixed``/``moving``: paths (NIfTI, NRRD, MHA) or SimpleITK images, any size, spacing,
    orientation and pixel type. ``fixed_labels``/``moving_labels``: optional label maps on their
    image's grid, for the Dice report and the warped label map. ``prealign``: affine pre-alignment
    on/off (bool). ``io_steps``: instance-optimisation steps, an int from 0 (off) to 2000.
    ``device``: 'auto', 'cpu' or 'cuda' ('cuda' needs a usable GPU). ``weights``: a weights file
    (default: bundled model) whose SHA-256 is verified against ``<file>.sha256``; a file without one
    is refused unless ``allow_unverified=True``. ``modality``: 'auto', 'mr' or 'ct' for both images,
    or a (fixed, moving) pair. ``contrast_matching``: give the moving image the fixed image's
    contrast before the network ('auto': when the contrasts differ; 'on'; 'off'), see
    :mod:`fmsam.contrast`. ``progress(stage, fraction)``: called often; it may raise
    :class:`fmsam.errors.Cancelled` to stop, and any exception it raises reaches the caller as
    itself. ``model``: an already loaded ``(network, config)`` to reuse across calls (instead of
    ``weights``).

    Every argument is checked before any work (:mod:`fmsam.arguments`): a bad one raises
    :class:`InputError`, as do bad images and weights. :class:`RegistrationError`: the result is
    not finite (nothing is returned).
    """
    from .weights import bundled_config, load_model

    check_register_arguments(fixed, moving, fixed_labels, moving_labels, prealign, io_steps, device,
                             weights, modality, progress, model, contrast_matching, allow_unverified)
    stages = _Stages(progress)
    total_start = time.perf_counter()

    stages.begin("prepare")
    fixed_image = load_scalar_volume(fixed, "fixed image")
    moving_image = load_scalar_volume(moving, "moving image")
    fixed_label_map = moving_label_map = None
    if fixed_labels is not None:
        fixed_label_map = load_label_map_on_grid(fixed_labels, fixed_image, fixed, "fixed")
    if moving_labels is not None:
        moving_label_map = load_label_map_on_grid(moving_labels, moving_image, moving, "moving")
    loading = None
    if model is not None:
        config = model[1]
    elif weights is None:
        # PyTorch's import (about 1 s) and the weights are loaded in a thread while the images are
        # normalised and aligned, which needs only the network options (from the manifest).
        config = bundled_config()
        loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmsam-load")
        loading = loader.submit(load_model, None, "cpu")
        loader.shutdown(wait=False)
    else:
        model = load_model(weights, "cpu", allow_unverified)
        config = model[1]
    fixed_modality, moving_modality = (modality, modality) if isinstance(modality, str) else modality
    # Both images are brought to the axis layout of the training images by a pure permutation or
    # flip of their grids (no resampling): the network learned anatomy in that layout, and the
    # result no longer depends on how a reader stored the voxels (Slicer flips some NIfTI axes).
    layout = config.get("orientation", TRAINING_ORIENTATION)
    network_fixed, fixed_modality = normalised_image(reorient(fixed_image, layout), fixed_modality)
    moving_normalised, moving_modality = normalised_image(reorient(moving_image, layout), moving_modality)

    stages.begin("affine")
    affine = prealign_or_explain(stages, network_fixed, moving_normalised) if prealign else identity_affine()
    moving_on_fixed = fields.resample(moving_normalised, network_fixed, affine)
    report = {}
    lookup, gain = contrast_decision(*(sitk.GetArrayViewFromImage(image)[DECISION_SAMPLING]
                                       for image in (network_fixed, moving_on_fixed)))
    matched = contrast_matching == "on" or (contrast_matching == "auto" and gain >= MIN_CORRELATION_GAIN)
    moving_own_contrast = moving_normalised
    report["contrast_matching"] = {"applied": bool(matched), "correlation_gain": round(gain, 4)}
    if matched:
        # The moving image in the fixed image's contrast is what the network sees (instance
        # optimisation uses its own contrast, IO_SIMILARITY_ACROSS_CONTRASTS), and the affine is
        # refined on it (its fine level only, about 0.4 s):
        # mutual information copes with other contrasts, but less well (on 10 gamma-changed pairs it
        # aligned worse than on the originals). Refining instead of starting again: Dice on the gamma
        # and inverted pairs within 0.002 of a full second run, for a third of its time.
        moving_normalised = fields.image_on_grid(
            apply_lookup(lookup, sitk.GetArrayViewFromImage(moving_normalised)), moving_normalised)
        if prealign:
            affine = prealign_or_explain(stages, network_fixed, moving_normalised, initial=affine)
        moving_on_fixed = fields.resample(moving_normalised, network_fixed, affine)

    stages.begin("network")
    network = (loading.result() if loading is not None else model)[0]
    import torch

    from .inference import (choose_device, grid_for, run_with_cpu_fallback, symmetric_displacement,
                            to_network_grid)
    from .layers import gaussian_smooth
    from .instance_optimisation import instance_optimise

    torch_device = choose_device(device)
    grid = grid_for(network_fixed, config)

    def predict(run_device):
        network.to(run_device)
        fixed_net = to_network_grid(sitk.GetArrayViewFromImage(network_fixed), grid, run_device)
        moving_net = to_network_grid(sitk.GetArrayViewFromImage(moving_on_fixed), grid, run_device)
        with torch.no_grad():  # both directions in one batch
            displacement, backward = network(torch.cat([fixed_net, moving_net]),
                                             torch.cat([moving_net, fixed_net])).split(1)
        if not io_steps:
            displacement = symmetric_displacement(displacement, backward)
            if config.get("output_smoothing"):  # sigma in network-grid voxels, set at export
                displacement = gaussian_smooth(displacement, config["output_smoothing"])
        else:
            stages.begin("instance_optimisation")
            similarity, io_moving = "lncc", moving_net
            if matched:  # contrasts differ
                similarity = IO_SIMILARITY_ACROSS_CONTRASTS
            if similarity == "squared_lncc":  # contrast-independent: the moving image's own contrast
                # GetArrayFromImage (a copy): a view would outlive the resampled image it shows
                io_moving = to_network_grid(sitk.GetArrayFromImage(
                    fields.resample(moving_own_contrast, network_fixed, affine)), grid, run_device)
            displacement, losses = instance_optimise(displacement, backward, fixed_net, io_moving,
                                                     io_steps, config, progress=stages.update,
                                                     similarity=similarity)
            report["io_loss_before"], report["io_loss_after"] = losses[0], losses[-1]
            report["io_similarity"] = similarity
        return displacement.cpu()

    displacement, used_device = run_with_cpu_fallback(predict, torch_device)

    stages.begin("compose")
    deformable_index = fields.network_to_fixed_index_displacement(displacement, network_fixed.GetSize())
    field = fields.compose_fixed_to_moving(network_fixed, affine, deformable_index)
    field = back_to_grid(field, network_fixed, fixed_image)
    check_finite_result(field, network)
    transform = fields.field_transform(field, fixed_image)

    stages.begin("warp")
    warped = fields.resample(moving_image, fixed_image, transform)
    warped_labels = None
    if moving_label_map is not None:
        warped_labels = fields.resample(moving_label_map, fixed_image, transform, nearest=True)
    if fixed_label_map is not None and moving_label_map is not None:
        fixed_array = sitk.GetArrayViewFromImage(fixed_label_map)
        labels = labels_in_both(fixed_array, sitk.GetArrayViewFromImage(moving_label_map))
        initial_labels = fields.resample(moving_label_map, fixed_image, sitk.Transform(), nearest=True)
        affine_labels = fields.resample(moving_label_map, fixed_image, affine, nearest=True)
        report["dice_labels"] = int(len(labels))
        for key, labels_on_fixed in (("dice_initial", initial_labels), ("dice_affine", affine_labels),
                                     ("dice_after", warped_labels)):
            if len(labels):  # no shared label: no Dice (NaN is not JSON), and a warning below
                report[key] = mean_dice(fixed_array, sitk.GetArrayViewFromImage(labels_on_fixed), labels)

    # Label-free check: did the deformable step make the images more alike than the affine did?
    report["mi_affine"], report["mi_registered"], warning = deformable_gain(
        fixed_image, fields.resample(moving_image, fixed_image, affine), warped)
    report["warnings"] = [warning] if warning else []
    if report.get("dice_labels") == 0:
        report["warnings"].append("the two label maps share no label (> 0): no Dice is reported")

    stages.begin("jacobian")
    determinant = jacobian_determinant(field, fixed_image)
    with np.errstate(over="ignore"):  # beyond float32: inf, refused here
        jacobian_values = determinant.astype(np.float32)
    check_finite_result(jacobian_values, network, "Jacobian determinant")
    jacobian = fields.image_on_grid(jacobian_values, fixed_image)
    stages.end()

    report.update(jacobian_statistics(determinant))
    seconds = dict(stages.seconds)
    seconds["total"] = round(time.perf_counter() - total_start, 3)
    report.update({
        "seconds": seconds, "device": used_device.type, "requested_device": device,
        "prealign": bool(prealign), "io_steps": int(io_steps), "network_grid": list(grid),
        "modality": {"fixed": fixed_modality, "moving": moving_modality},
        "fixed_size": list(fixed_image.GetSize()), "fixed_spacing": list(fixed_image.GetSpacing()),
        "weights": weights_provenance(network), "fmsam_version": __version__,
    })
    if non_finite_entries(report):  # report.json is strict JSON
        raise RegistrationError("the registration's figures %s are not finite; no result is returned or "
                                "written" % ", ".join(non_finite_entries(report)))
    return RegistrationResult(fixed=fixed_image, field=field, affine=affine, warped=warped,
                              warped_labels=warped_labels, jacobian=jacobian, report=report)
