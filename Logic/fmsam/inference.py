"""Running the network on a pre-aligned pair: device choice, network grid, the fast and accurate
modes (:data:`fmsam.options.MODES`), the inverse field, CUDA fallback.

Displacements here are (1, 3, D, H, W) tensors in normalised coordinates on the network grid (see
:mod:`fmsam.layers`): ``forward`` maps a fixed point x to x + forward(x) in the affinely pre-aligned
moving image, ``inverse`` maps back.
"""
import dataclasses
import warnings

import numpy as np
import torch

from .jacobian import capped_strides, grid_determinant
from .layers import compose, gaussian_smooth, invert, normalised_to_voxels, resize, warp
from .networks import network_grid_shape
from .options import DEVICES


def cuda_usable():
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # broken driver installs raise here rather than returning False
        return False


def choose_device(name="auto"):
    """'auto' -> CUDA when usable, else CPU. Asking for CUDA without a usable GPU is an error."""
    from .errors import InputError

    if name not in DEVICES:
        raise InputError("device must be one of %s, not %r" % (", ".join(DEVICES), name))
    if name == "auto":
        return torch.device("cuda" if cuda_usable() else "cpu")
    if name == "cuda" and not cuda_usable():
        raise InputError("device 'cuda' was requested but no usable CUDA GPU was found")
    return torch.device(name)


#: Fewest network voxels along any axis: the coarse step runs at half resolution and its U-Net
#: halves three more times, so 16 leaves it one voxel at the bottom.
MIN_GRID = 16

#: A fixed image with many voxels gets a finer network grid than the model's voxel budget: the budget
#: rises to this fraction of the image's voxels (0: never), at most :data:`MAX_NETWORK_VOXELS` (twice
#: the bundled budget). A 1 mm brain-only image (OASIS, 4.4 M voxels) gets 1.5 mm network voxels
#: instead of 1.8; 2 mm heads (1.3 M voxels) and cardiac stacks keep the budget's grid. Chosen on 30
#: OASIS-like selection pairs (IXI, skull-stripped, cropped to the brain, resampled to 1 mm): Dice
#: 0.6291 -> 0.6395, better on 30 of 30, fast mode 1.5 times the seconds (docs/training-log.md, G2).
#: (The other way, a coarser grid there, lost: 2.0 mm -0.0085, 2.3 mm -0.0192; trial G1.)
NETWORK_VOXELS_PER_IMAGE_VOXEL = 0.3
MAX_NETWORK_VOXELS = 1600000
#: The same fraction for accurate mode's grid (its network pass and instance optimisation): 0, the
#: model's budget grid whatever the image's voxels. G2 chose the finer grid on fast mode only; with it
#: accurate mode took 1.7-2 times the seconds for the same Dice on selection data (abdomen, CT window,
#: 12 pairs: 0.3911 -> 0.3967 without it; OASIS-like proxy, 10 pairs: 0.6548 -> 0.6538; trial H1,
#: docs/training-log.md).
ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL = 0.0


def grid_for(fixed_image, config, accurate=False):
    """Network grid (D, H, W) for a fixed SimpleITK image, at the voxel budget of training.

    The grid keeps the image's physical aspect ratio, so network voxels are cubes in millimetres as
    in training, whatever the image's own voxels. A thin anisotropic stack therefore gets many
    network voxels across its slices, not one per slice: a 350 x 350 mm short-axis stack of three
    23 mm slices (69 mm) becomes 32 x 160 x 160 voxels of 2.2 mm, its slices linearly interpolated,
    rather than 3 x 500 x 500 voxels 10 times thicker than wide, an anisotropy the network never
    saw. No axis gets fewer than :data:`MIN_GRID` voxels (a 2-slice 24 mm stack: 16). An image with many
    voxels raises the budget (:data:`NETWORK_VOXELS_PER_IMAGE_VOXEL`; with ``accurate``, for accurate
    mode's instance optimisation, :data:`ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL`)."""
    size = np.array(fixed_image.GetSize()[::-1], dtype=np.float64)       # k, j, i
    spacing = np.array(fixed_image.GetSpacing()[::-1], dtype=np.float64)
    budget = int(np.prod(config.get("grid", (64, 80, 80))))
    fraction = ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL if accurate else NETWORK_VOXELS_PER_IMAGE_VOXEL
    if fraction > 0:
        budget = max(budget, min(MAX_NETWORK_VOXELS, int(fraction * np.prod(size))))
    return tuple(max(MIN_GRID, n) for n in network_grid_shape(size * spacing, voxels=budget))


def to_network_grid(voxels_kji, grid, device):
    """A (k, j, i) numpy volume as a (1, 1, D, H, W) tensor resized to the network grid."""
    tensor = torch.from_numpy(np.array(voxels_kji, dtype=np.float32))[None, None]  # own, writable copy
    return resize(tensor.to(device), grid)


def run_with_cpu_fallback(function, device, *args):
    """Call ``function(device, *args)``; on CUDA out-of-memory, warn and run it on the CPU.

    Returns ``(result, device actually used)``.
    """
    try:
        return function(device, *args), device
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warnings.warn("CUDA ran out of memory; running on the CPU instead")
        cpu = torch.device("cpu")
        return function(cpu, *args), cpu


def symmetric_displacement(forward, backward):
    """The fixed-to-moving displacement as the mean of the network's two estimates of it: the forward
    one and the inverse of the backward (moving-to-fixed) one. Both (1, 3, D, H, W), normalised.

    A network's errors are partly systematic: given one image twice, the bundled model still moves it
    by about 1.3 mm, the same way in both directions, which this cancels (0.05 mm), and averaging two
    estimates also raised Dice on 8 IXI pairs from 0.550 to 0.561, for one more network pass
    (about 0.3 s on a CPU). Measured in docs/benchmarks.md.
    """
    return 0.5 * (forward + invert(backward))


#: Damped fixed-point iterations that refine the inverse field from the network's own estimate of
#: it (its backward field), and their step. Undamped (step 1) the iteration oscillates where the
#: field's gradient exceeds 1: on the sample pair 959 network voxels kept round-trip errors above
#: 0.5 mm (up to 10 mm) however many iterations ran. Step 0.7, 6 iterations from the backward field:
#: round trip mean 0.002 mm, 99th percentile 0.017 mm, max 0.33 mm on the sample pair (0.0015 /
#: 0.012 / 0.09 mm on IXI013 <- IXI014) for 6 warps (about 0.2 s of CPU); starting from the
#: symmetric estimate of the inverse was no better for its extra 5 warps and smoothing.
INVERSE_ITERATIONS = 6
INVERSE_STEP = 0.7


def refine_inverse(forward, estimate, iterations=INVERSE_ITERATIONS, step=INVERSE_STEP):
    """The inverse of ``forward`` by the damped fixed-point iteration
    ``v <- (1 - step) v + step (-forward(x + v(x)))`` started from ``estimate`` (the network's
    backward field, already close), so that the two fields written map points back where they came
    from (:func:`round_trip_error`)."""
    return invert(forward, iterations, initial=estimate, step=step)


def round_trip_error(forward, inverse):
    """``x + inverse(x) + forward(x + inverse(x)) - x`` at every network voxel: (1, 3, D, H, W),
    normalised; zero for an exact inverse."""
    return compose(forward, inverse)


#: Fold removal: network-grid voxels whose det J at any of their 8 trilinear cell corners (one-sided
#: differences, ``grid_determinant(..., 'corners')``; central differences give their mean) is below this
#: are smoothed (a margin above 0, because the fixed grid's finite differences, on which folding is
#: reported, sample the field elsewhere: with 0.1 the cardiac selection pair 116_T2 <- 116_DE,
#: folding 0.061 % for a continuation of the bundled model, came out with det J >= 0.137 on its
#: fixed grid). One-sided differences too because instance optimisation can leave an odd-even
#: oscillation that central differences do not see: on the abdomen report pair 0003 <- 0010 in
#: accurate mode, central det J >= 0.116 after removal by central differences alone, forward det J
#: down to -0.48 on 33 voxels, and 0.00018 % of the fixed voxels folded. All 8 corners, not only
#: the forward one: a fold at another corner of a cell is otherwise not seen (found by a review).
UNFOLD_MIN_DETERMINANT = 0.1
#: At most this many rounds of local smoothing (each: mask of the low voxels dilated by 2 voxels, more
#: along a thick stack's axis (:func:`remove_folds`), softened with sigma 1, blended with the field
#: smoothed at sigma 1.5); 4 rounds removed the folds of
#: that pair. Rounds run only when the field folds (det J <= 0) somewhere, and stop when one does not
#: reduce the low voxels: smoothing leaves a linear field as it is, so a wide region compressed below
#: the margin but not folded would otherwise be smoothed at its edges round after round for nothing.
UNFOLD_MAX_ROUNDS = 20


def remove_folds(displacement, min_determinant=UNFOLD_MIN_DETERMINANT, max_rounds=UNFOLD_MAX_ROUNDS,
                 strides=(1, 1, 1)):
    """The displacement (1, 3, D, H, W, normalised) with its folds smoothed away locally, and a report:
    ``unfold_voxels`` (network voxels folded before: det J <= 0 at any of the voxel's 8
    trilinear-cell corners, ``grid_determinant(..., 'corners')``, hence also by central differences),
    ``unfold_rounds`` (rounds of smoothing; 0: the field is returned as it was), ``unfold_left_voxels``
    (folded after), ``unfold_max_change_voxels`` (largest change of the displacement, in network
    voxels). A field that folds somewhere is smoothed near its voxels below ``min_determinant`` (a
    margin), round after round while that reduces them, and the field with the fewest is returned;
    only their neighbourhood changes. A field without folds is untouched (one corner determinant,
    about 0.1 s on the 80 x 100 x 100 grid, one thread). Inside a cell a trilinear map can fold while all
    its corners are positive (rare); the 0.1 margin is what covers that.

    ``strides`` (D, H, W; :func:`secant_strides`): where the fixed image's voxels are coarser than the
    network's along an axis, its determinant differentiates across that many network voxels (a
    cardiac stack's 10-23 mm slices), and a field without a fold on the network grid can fold there.
    The determinants are then secants over the strides (:func:`fmsam.jacobian.grid_determinant`) and
    the mask reaches as far along those axes (dilation by 2 + stride - 1 voxels; the smoothing stays
    sigma 1.5: a sigma of 1.5 strides left the removal stuck on 2 of 3 cardiac selection pairs that
    fold this way). The voxel counts of the report then count secant cells, and every network plane
    starts one, not only those a fixed voxel falls on: conservative."""
    with torch.no_grad():
        return _remove_folds(displacement, min_determinant, max_rounds, tuple(int(n) for n in strides))


def secant_strides(fixed_spacing_kji, grid_spacing_kji):
    """Network voxels (D, H, W) one fixed voxel spans along each axis: the fixed image's spacing over
    the network grid's, both in mm in (k, j, i) order, rounded (half to even), at least 1: the strides
    over which the fixed grid's determinant differentiates the network's field."""
    ratio = np.asarray(fixed_spacing_kji, dtype=np.float64) / np.asarray(grid_spacing_kji, dtype=np.float64)
    return tuple(max(1, int(round(value))) for value in ratio)


def _remove_folds(displacement, min_determinant, max_rounds, strides):
    def corner_determinant(field):  # never above the central det J: see grid_determinant
        return grid_determinant(normalised_to_voxels(field), "corners", strides)

    # dilation radius per axis: 2 + stride - 1, the stride as grid_determinant uses it
    reach = tuple(1 + stride for stride in capped_strides(strides, displacement.shape[2:]))

    original, rounds = displacement, 0
    determinant = corner_determinant(displacement)
    folded = int((determinant <= 0).sum())
    best, best_low, left = displacement, int((determinant < min_determinant).sum()), folded
    while folded and best_low and rounds < max_rounds:
        low = determinant < min_determinant
        mask = torch.nn.functional.max_pool3d(low[None, None].to(best.dtype), tuple(2 * r + 1 for r in reach),
                                              stride=1, padding=reach)
        mask = gaussian_smooth(mask, 1.0).clamp(0.0, 1.0)
        candidate = best + mask * (gaussian_smooth(best, 1.5) - best)
        candidate_determinant = corner_determinant(candidate)
        candidate_low = int((candidate_determinant < min_determinant).sum())
        if candidate_low >= best_low:  # a round that does not help ends the removal; it is not kept
            break
        rounds += 1
        best, best_low, determinant = candidate, candidate_low, candidate_determinant
        left = int((determinant <= 0).sum())
    report = {"unfold_voxels": folded, "unfold_rounds": rounds, "unfold_left_voxels": left,
              "unfold_max_change_voxels": round(float(normalised_to_voxels(best - original).abs().max()), 4)}
    return best, report


@dataclasses.dataclass
class NetworkFields:
    """What a mode computed on the network grid (normalised displacements, CPU tensors)."""

    forward: torch.Tensor          # (1, 3, D, H, W) fixed -> moving
    inverse: torch.Tensor          # (1, 3, D, H, W) moving -> fixed, refined to invert ``forward``
    report: dict                   # figures of the mode (instance optimisation's losses)
    #: (iterations, step) of :func:`refine_inverse` for this mode's fields, used again after fold removal
    inverse_refinement: tuple = (INVERSE_ITERATIONS, INVERSE_STEP)


def both_directions(network, fixed_net, moving_net):
    """The network's (forward, backward) displacements for (fixed, moving) and (moving, fixed), in
    one batch; inputs (1, 1, D, H, W) on the network grid."""
    with torch.no_grad():
        both = network(torch.cat([fixed_net, moving_net]), torch.cat([moving_net, fixed_net]))
    # Standard layout again whatever the network ran in (channels-last on a CPU): grid sampling
    # and its gradients, in everything that follows, are many times slower on channels-last tensors.
    return both.contiguous().split(1)


def fast_fields(network, config, fixed_net, moving_net):
    """Fast mode: the network alone, as the model's ``network_passes`` say (set at export; 1 when
    absent). One pass: each direction is the mean of the network's two estimates of it
    (:func:`symmetric_displacement`). More: :func:`iterated_fields`. Either way smoothed by the
    model's output smoothing (sigma in network voxels, set at export)."""
    passes = config.get("network_passes", 1)
    if passes > 1:
        forward, estimate = iterated_fields(network, fixed_net, moving_net, passes, config.get("output_smoothing"))
        return NetworkFields(forward, refine_inverse(forward, estimate, *BENDING_FIELD_REFINEMENT),
                             {"network_passes": passes}, BENDING_FIELD_REFINEMENT)
    forward, backward = both_directions(network, fixed_net, moving_net)
    displacement = symmetric_displacement(forward, backward)
    if config.get("output_smoothing"):
        displacement = gaussian_smooth(displacement, config["output_smoothing"])
    return NetworkFields(displacement, refine_inverse(displacement, backward), {"network_passes": 1})


#: ``(iterations, step)`` of :func:`refine_inverse` for fields that bend fast: iterated passes' (from
#: the estimate of :func:`iterated_fields`), slice-refined stacks' and accurate mode's. The composed
#: field bends faster than one pass's: at step 0.7 (:data:`INVERSE_STEP`) the iteration oscillates
#: (round trip up to 3 network voxels on the sample pair with two passes of v9b's weights, however
#: many iterations). At 0.5 it converged there for v9b; round trip max / 99th percentile in network
#: voxels, each iteration about 0.02 s on two cores: 6 iterations 0.55 / 0.032, 8 0.46 / 0.014, 10
#: 0.37 / 0.006, 12 0.27 / 0.003. Where fold removal has smoothed a field, one point can keep
#: oscillating at 0.5 however many iterations run: accurate mode's field on the sample pair (round
#: trip max 0.41 mm with fmsam_adam_v9b, 2.37 mm with fmsam_adam_v11's weights) and fast mode's with
#: fmsam_adam_v12's weights (2.08 mm). 20 iterations at 0.3 converge in all these cases: accurate
#: mode 0.117 / 0.120 mm (v9b / v11), fast mode 0.125 mm (v11) and 0.144 mm (v12), for about 0.3 s
#: more than 10 at 0.5 (docs/training-log.md, 2026-12-05; `out/i18/inverse_diag.py`,
#: `out/i19/fast_inverse_diag.py`). (The withdrawn design of two plain forward passes gave 13 mm at
#: 0.7 and 0.31 voxels with ten at 0.5: docs/training-log.md, "Session of 2026-12-03 (night)".)
BENDING_FIELD_REFINEMENT = (20, 0.3)


def iterated_fields(network, fixed_net, moving_net, passes, smoothing=None):
    """``(forward, inverse estimate)``, (1, 3, D, H, W) normalised displacements of ``passes`` network
    passes: first one symmetric batch (the network both ways, averaged as in
    :func:`symmetric_displacement`), then ``passes - 1`` forward passes, each given the moving image
    warped by the composition so far, each pass's field less the network's own bias, smoothed by ``smoothing``
    (sigma, network voxels) and composed (the last pass's map runs first). The inverse estimate
    starts from the network's backward field less the bias and composes the later passes' negated
    fields in the opposite order.

    What the network leaves misaligned in one pass it sees again, nearer, in the next. Its bias (the
    part of its estimate shared by both directions, which moves an image registered to itself) is
    half the difference of the first batch's two estimates; the symmetric first pass cancels it, and
    a forward pass alone keeps it: two forward passes moved the sample image registered to itself by
    0.375 mm on average (99th percentile 1.0 mm) against 0.003 mm for one symmetric batch, so it is
    subtracted from the later passes (docs/benchmarks.md, "Iterated passes and secant fold
    removal")."""
    with torch.no_grad():
        first, backward = both_directions(network, fixed_net, moving_net)
        forward = symmetric_displacement(first, backward)
        bias = first - forward  # = half the difference of the two estimates
        if smoothing:
            forward = gaussian_smooth(forward, smoothing)
        inverse = backward - bias  # the backward estimate carries the same bias
        for _ in range(passes - 1):
            warped = warp(moving_net, forward, padding_mode="border")
            update = network(fixed_net, warped).contiguous() - bias
            if smoothing:
                update = gaussian_smooth(update, smoothing)
            forward, inverse = compose(forward, update), compose(-update, inverse)
    return forward, inverse


#: The grid on which accurate mode's instance optimisation compares the images, per axis a multiple of
#: the network grid's voxels, at most the fixed image's own (1.0: the network grid).
IO_IMAGE_SCALE = 1.0


def instance_optimisation_grid(grid, fixed_shape):
    """(D, H, W) on which instance optimisation compares the images: the network ``grid`` times
    :data:`IO_IMAGE_SCALE` per axis, rounded, but no finer than the fixed image's ``fixed_shape``
    (k, j, i) and no coarser than ``grid``."""
    return tuple(max(int(n), min(int(f), int(round(n * IO_IMAGE_SCALE)))) for n, f in zip(grid, fixed_shape))


def accurate_fields(network, config, fixed_net, moving_net, steps, similarity="lncc", io_moving=None,
                    progress=None, io_fixed=None):
    """Accurate mode: the network's two fields refined together on this pair for ``steps`` steps
    (:func:`fmsam.instance_optimisation.instance_optimise`) with ``similarity``; ``io_moving`` is
    the moving image the similarity compares (default ``moving_net``; the moving image in its own
    contrast for 'squared_lncc'), ``io_fixed`` the fixed one (default ``fixed_net``); both (1, 1, ...)
    on the network grid or on a finer one (:func:`instance_optimisation_grid`). ``progress(fraction)``
    after every step. (Refining on a grid 0.6 times the network's per axis was tried: a quarter of
    the cost per step, but Dice 0.05 lower on 4 IXI pairs; fewer steps on the full grid cost 0.005:
    docs/benchmarks.md, "Speed".) It starts from one symmetric batch whatever the model's
    ``network_passes`` (starting from two iterated passes each way gave 0.6525 against 0.6509 on the
    sample pair, not measured further)."""
    from .instance_optimisation import instance_optimise

    forward, backward = both_directions(network, fixed_net, moving_net)
    forward, backward, losses = instance_optimise(
        forward, backward, fixed_net if io_fixed is None else io_fixed,
        moving_net if io_moving is None else io_moving, steps, config, progress=progress, similarity=similarity)
    return NetworkFields(forward, refine_inverse(forward, backward, *BENDING_FIELD_REFINEMENT),
                         {"io_loss_before": losses[0], "io_loss_after": losses[-1], "io_similarity": similarity},
                         BENDING_FIELD_REFINEMENT)


def refine_stack_slices(computed, fixed, moving, axis, planes, similarity, device, progress=None):
    """:class:`NetworkFields` with each slice of a thick-slice stack corrected in plane
    (:func:`fmsam.slice_refinement.refine_slices`): the forward field becomes ``forward o (x + c)``,
    the inverse is started from ``(x - c) o inverse`` and refined as bending fields are.
    ``fixed``/``moving``: (k, j, i) arrays on the fixed grid (the moving one through the affine, in
    the contrast ``similarity`` compares). ``progress(fraction)`` after every step (it may raise to
    stop)."""
    from .slice_refinement import refine_slices

    def on_fixed_grid(voxels):
        return torch.from_numpy(np.array(voxels, dtype=np.float32))[None, None].to(device)  # a copy: views are read-only

    correction, report = refine_slices(computed.forward, on_fixed_grid(fixed), on_fixed_grid(moving),
                                       planes, axis, similarity, progress=progress)
    with torch.no_grad():
        forward = compose(computed.forward, correction)
        inverse = refine_inverse(forward, compose(-correction, computed.inverse), *BENDING_FIELD_REFINEMENT)
    return NetworkFields(forward, inverse, dict(computed.report, **report), BENDING_FIELD_REFINEMENT)


def network_fields(network, config, device, fixed, moving, grid, io_steps=0, similarity="lncc",
                   io_moving=None, on_instance_optimisation=None, progress=None, strides=(1, 1, 1),
                   slice_planes=None):
    """Run a mode on a pre-aligned pair: ``(NetworkFields on the CPU, device used)``.

    ``fixed``/``moving``: (k, j, i) arrays, normalised, the moving one resampled onto the fixed grid
    through the affine; ``grid``: the network grid (D, H, W) (:func:`grid_for`). ``io_steps`` 0 is
    fast mode (:func:`fast_fields`), more is accurate mode (:func:`accurate_fields`, which calls
    ``on_instance_optimisation()`` first, then ``progress(fraction)`` after each step; ``io_moving``
    is the (k, j, i) moving image its similarity compares, default ``moving``; the images it compares
    are on :func:`instance_optimisation_grid`, the network grid at the default
    :data:`IO_IMAGE_SCALE`). ``slice_planes``, ``(axis, planes)`` of a stack of thick slices
    (:func:`fmsam.slice_refinement.slice_planes`): every fixed slice then gets its own in-plane
    correction (:func:`refine_stack_slices`, which calls ``progress(fraction)`` after each of its
    steps too, so that a caller can stop it); without it the report's ``slice_refinement`` is
    ``{"applied": False}``. The forward field then goes
    through :func:`remove_folds` with ``strides`` (:func:`secant_strides`; its figures join the
    report; the inverse is refined again when it changed). A CUDA run out of memory is repeated on
    the CPU."""
    def run(run_device):
        network.to(run_device)
        if run_device.type == "cpu":
            # oneDNN's 3-D convolutions are about 30 % faster in this layout on a CPU (the network's
            # pass 1.6 s of CPU instead of 2.3 s on the sample pair); results equal to 1e-7.
            network.to(memory_format=torch.channels_last_3d)
        fixed_net = to_network_grid(fixed, grid, run_device)
        moving_net = to_network_grid(moving, grid, run_device)
        compared = moving if io_moving is None else io_moving  # the moving image the similarity compares
        if not io_steps:
            computed = fast_fields(network, config, fixed_net, moving_net)
        else:
            if on_instance_optimisation is not None:
                on_instance_optimisation()
            io_grid = instance_optimisation_grid(grid, np.shape(fixed))
            io_fixed = None if io_grid == tuple(grid) else to_network_grid(fixed, io_grid, run_device)
            io_net = (None if io_moving is None and io_fixed is None
                      else to_network_grid(compared, io_grid, run_device))
            computed = accurate_fields(network, config, fixed_net, moving_net, io_steps, similarity,
                                       io_net, progress, io_fixed)
        if slice_planes is not None:
            computed = refine_stack_slices(computed, fixed, compared, *slice_planes, similarity, run_device,
                                           progress)
        else:
            computed.report["slice_refinement"] = {"applied": False}
        forward, unfolded = remove_folds(computed.forward, strides=strides)
        inverse = computed.inverse
        if unfolded["unfold_rounds"]:  # refined again as the mode refined it
            inverse = refine_inverse(forward, inverse, *computed.inverse_refinement)
        return NetworkFields(forward.cpu(), inverse.cpu(), dict(computed.report, **unfolded))

    return run_with_cpu_fallback(run, device)
