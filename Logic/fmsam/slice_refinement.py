"""Slice refinement: each slice of a thick-slice stack gets its own in-plane correction.

Short-axis cardiac MR (and other 2-D multi-slice stacks) is acquired slice by slice, each slice in
its own breath-hold, so neighbouring slices can be shifted in plane independently of each other.
The network sees the stack on its grid of cubic voxels with the slices interpolated between them,
and its field is smooth across slices: it cannot follow one slice left and the next right. On
cardiac selection pairs this was most of the gap to SimpleITK demons, whose field is smoothed by
about 1 mm physical along every axis and so leaves the slices nearly independent: coupling demons'
slices (10 mm across them) took its cross-sequence NMI from 1.0681 to 1.0452, below the network's
1.0516 (``Testing/Benchmarks/cardiac_diagnostics.py``; docs/training-log.md, "Session of
2026-12-04").

After the network (and instance optimisation, when :data:`INSTANCE_OPTIMISATION_ON_STACKS`), every
fixed slice gets an in-plane displacement ``u_s`` (a coarse grid of nodes every :data:`NODE_STRIDE`
refinement voxels, upsampled linearly; the refinement voxels are :data:`SPACING_MM` in plane),
optimised with Adam so that the moving image sampled at ``x + u_s(x) + forward(x + u_s(x))`` matches
the fixed slice in local NCC within the slice (:data:`WINDOW` voxels square), plus
:data:`REGULARISATION` times the mean squared difference of neighbouring nodes, plus
:data:`FOLD_WEIGHT` times a fold term: how far the refined map's det J at the slices falls below
:data:`FOLD_MARGIN` (so that the fold removal that follows, which smooths a folded field locally and
with it the slices' corrections, has little left to do). All slices are
refined together, as one (K, h, w) stack of planes. No displacement across slices is added. The
corrections then join the network's field on its own grid: the network planes next to a fixed slice
take its correction, those between two slices a linear blend of theirs (:data:`BLEND_BETWEEN_SLICES`;
no fixed voxel samples them, but the fold removal that follows reads them).

On by default (``fmsam register --slice-refinement off`` turns it off) for stacks of 2 to
:data:`MAX_SLICES` slices: on the 16 cardiac selection pairs it raised fast mode's NMI on every pair
for about 5-8 s more on a 5-6-slice stack (idle 2-core machine), within the 10 s its decision rules
allowed (each slice a batch item of PyTorch's 2-D sampler, box means by cumulative sums;
docs/training-log.md). In accurate mode it replaces the 3-D instance optimisation on the stacks it
refines (:data:`INSTANCE_OPTIMISATION_ON_STACKS`).
"""
import math

# PyTorch and the modules built on it are imported where they are used, so that the Slicer module
# can ask whether a volume is a stack the refinement refines (:func:`planes_to_refine`) in its main
# process without loading them.

#: A fixed image is a stack of thick slices, and is refined slice by slice, when the spacing along
#: one axis (the slices') is at least this many times the other two (:func:`stack_axis`). MyoPS
#: stacks: 16 to 32; the thick-slice brains of ``make_unfamiliar.py`` (2 x 2 x 6 mm): 3, not refined.
STACK_RATIO = 4.0
#: At most this many slices: a thick-slice volume with more (5 mm CT of a trunk: 60 or more) is a
#: volumetric acquisition, not slices taken one by one, and would take many times longer. MyoPS: 2 to
#: 6 slices; a clinical cardiac short-axis stack: 8 to 16.
MAX_SLICES = 32
#: In-plane spacing of the refinement's planes, mm (350 mm field of view: about 233 x 233 voxels).
SPACING_MM = 1.5
#: Refinement voxels between the correction's nodes along each in-plane axis (6 mm at 1.5 mm).
NODE_STRIDE = 4
#: Local NCC window within a slice, refinement voxels (121.5 mm: the heart and what surrounds it). 9
#: (with REGULARISATION 1000) until 2026-12-04 evening, then 17 with 300 (the best of four settings on
#: the cardiac selection pairs: fast mode NMI 1.0332 / 1.0583 -> 1.0356 / 1.0629, inter / cross); 41
#: that night, the best of five wider settings (windows 25 to 41, weights 100 to 1000): 1.0379 /
#: 1.0688; 81 since late that night, with the fold term (:data:`FOLD_WEIGHT`; docs/training-log.md,
#: trial 8). The box means are cumulative sums: a wider window costs nothing.
WINDOW = 81
#: Adam steps and step size (normalised coordinates, as the network's fields).
STEPS = 100
LEARNING_RATE = 0.01
#: Weight of the nodes' smoothness term (mean squared difference of neighbouring nodes, normalised).
REGULARISATION = 300.0
#: How the slices' corrections fill the network planes between two slices: the fraction of the gap
#: over which they blend linearly (0: each plane takes the nearest slice's correction, so the field
#: jumps half way between slices; 1: linear across the gap). The planes next to a slice, those a
#: fixed voxel of that slice samples, always hold its own correction (:func:`between_slices`). 0 until
#: 2026-12-04 night: the jumps read as folds (selection pair 3: 37428 network voxels to unfold with the
#: refinement, 2021 without), and removing them smoothed the field near the slices too; 1 gave fast
#: mode NMI 1.0385 / 1.0696 on the cardiac selection pairs instead of 1.0379 / 1.0688, better on 15 of
#: 16, no fold (docs/training-log.md, trial 7).
BLEND_BETWEEN_SLICES = 1.0
#: Whether accurate mode's 3-D instance optimisation runs before the refinement on a stack it
#: refines. False since 2026-12-04 evening: accurate mode computes fast mode's fields there (with its
#: own two-way affine), then the refinement. The 18 steps, regularised across slices the stack's
#: acquisition does not couple, lowered NMI on the cardiac selection pairs (1.0357 / 1.0633 without
#: them, 1.0338 / 1.0614 with, inter / cross) and took 30 s more (docs/training-log.md).
INSTANCE_OPTIMISATION_ON_STACKS = False
#: Weight of the refinement's fold term (0: none): the mean, over every FOLD_STRIDE-th voxel of the
#: planes in plane, of ``max(0, FOLD_MARGIN - det J)**2``, det J being that of the refined map
#: ``x + c(x) + forward(x + c(x))`` at the slices, the least of its 8 one-sided corner determinants
#: (:func:`fmsam.jacobian.grid_determinant`; across the slices over one slice gap, as the fold removal
#: that follows differentiates). A penalty, not a bound: the fold removal still runs where the field
#: folds. 0 until 2026-12-04 late night: the refinement ignored folding, and the fold removal ended at
#: its margin on every cardiac selection pair after 4-17 rounds that changed the field by up to 14
#: network voxels (with the removal off, for a diagnosis, NMI 1.0469 / 1.0797 but 0.13-1.70 % of fixed
#: voxels folded). 10 with WINDOW 81 was the best of six settings (weights 3, 10, 30, windows 41 and
#: 81): fast mode NMI 1.0385 / 1.0696 -> 1.0436 / 1.0770, better on 16 of 16, no fold, 0-2000 network
#: voxels for the fold removal to unfold (1694-24379 before) (docs/training-log.md, trial 8).
FOLD_WEIGHT = 10.0
#: det J below which the fold term acts (above the fold removal's 0.1 margin on the network grid).
FOLD_MARGIN = 0.3
#: The fold term's determinant is taken on every FOLD_STRIDE-th voxel of the planes in plane.
FOLD_STRIDE = 2


def stack_axis(spacing_kji):
    """The slice axis (0, 1 or 2 of (k, j, i)) of a stack of thick slices with this spacing (mm),
    or None: the axis whose spacing is at least :data:`STACK_RATIO` times both others'. (The
    pipeline reorients images to the training layout first, so the slices need not lie along k.)"""
    spacing = [float(s) for s in spacing_kji]
    axis = max(range(3), key=lambda n: spacing[n])
    others = [spacing[n] for n in range(3) if n != axis]
    return axis if spacing[axis] >= STACK_RATIO * max(others) else None


def slice_planes(size_kji, spacing_kji):
    """``(axis, planes)`` of a fixed image to refine slice by slice (:func:`stack_axis`,
    :func:`plane_shape`), or None: not a stack, or fewer than 2 or more than :data:`MAX_SLICES`
    slices."""
    axis = stack_axis(spacing_kji)
    if axis is None or not 2 <= size_kji[axis] <= MAX_SLICES:
        return None
    return axis, plane_shape(size_kji, spacing_kji, axis)


def planes_to_refine(image, slice_refinement):
    """:func:`slice_planes` of a SimpleITK image when ``slice_refinement`` is 'auto', else None.
    Whether it is None does not depend on the order of the image's axes, so the pipeline's
    reoriented image and the image as given (the Slicer module's) get the same answer."""
    if slice_refinement != "auto":
        return None
    return slice_planes(image.GetSize()[::-1], image.GetSpacing()[::-1])


def instance_optimisation_steps(io_steps, planes):
    """The instance-optimisation steps that run of ``io_steps`` asked, on a fixed image whose
    :func:`planes_to_refine` are ``planes``: none on a stack that is refined, unless
    :data:`INSTANCE_OPTIMISATION_ON_STACKS`."""
    return 0 if planes is not None and not INSTANCE_OPTIMISATION_ON_STACKS else io_steps


def plane_shape(size_kji, spacing_kji, axis):
    """(K, h, w): the stack's ``K`` slices along ``axis``, each resampled in plane to
    :data:`SPACING_MM` (the two other axes, in (k, j, i) order)."""
    in_plane = [max(2 * NODE_STRIDE, int(math.ceil((size_kji[n] - 1) * spacing_kji[n] / SPACING_MM)) + 1)
                for n in range(3) if n != axis]
    return (int(size_kji[axis]),) + tuple(in_plane)


def to_stack_layout(volume, axis, displacement=False):
    """(N, C, D, H, W) -> the same with the slice axis ``axis`` (of D, H, W) first and the other two
    in order; a displacement's channels (x, y, z along W, H, D) are reordered to match."""
    order = [axis] + [n for n in range(3) if n != axis]
    moved = volume.permute(0, 1, *[2 + n for n in order])
    if displacement:
        moved = moved[:, [2 - order[2], 2 - order[1], 2 - order[0]]]
    return moved.contiguous()  # the grid sampler is many times slower on permuted strides


def from_stack_layout(volume, axis, displacement=False):
    """The inverse of :func:`to_stack_layout`."""
    order = [axis] + [n for n in range(3) if n != axis]
    back = [order.index(n) for n in range(3)]
    if displacement:  # channel c of the stack layout lies along its axis 2 - c, i.e. original axis order[2 - c]
        volume = volume[:, [2 - order.index(2 - c) for c in range(3)]]
    return volume.permute(0, 1, *[2 + n for n in back]).contiguous()


def between_slices(count, depth, device=None):
    """For each of ``depth`` network planes spanning a stack of ``count`` slices (first and last at
    the first and last slice): ``(lower, upper, weight)``, the plane's correction being
    ``(1 - weight)`` times slice ``lower``'s plus ``weight`` times slice ``upper``'s
    (:data:`BLEND_BETWEEN_SLICES`; without blending ``upper`` is ``lower``, the nearest slice, and
    ``weight`` 0). A plane less than one plane spacing from a slice takes that slice's correction
    alone, so the fixed voxels of a slice, which sample only the two planes around them, get
    exactly it."""
    import torch

    position = torch.linspace(0.0, count - 1.0, depth, device=device)      # in slices
    if BLEND_BETWEEN_SLICES <= 0.0:
        nearest = torch.round(position).long()
        return nearest, nearest, torch.zeros(depth, device=device)
    lower = position.floor().clamp(max=count - 2).long()
    fraction = position - lower
    held = (count - 1.0) / max(depth - 1.0, 1.0)                            # one plane, in slices
    width = max(min(float(BLEND_BETWEEN_SLICES), 1.0 - 2.0 * held), 1e-6)
    return lower, lower + 1, ((fraction - 0.5) / width + 0.5).clamp(0.0, 1.0)


def without_slice_displacement(in_plane, shape):
    """(1, 2, K, h', w') in-plane displacement (x, y of the stack layout) -> (1, 3, *shape) with a
    zero z (across the slices), resized linearly to ``shape``."""
    import torch

    from .layers import resize

    return resize(torch.cat([in_plane, torch.zeros_like(in_plane[:, :1])], dim=1), shape)


def node_roughness(in_plane):
    """Mean squared difference of neighbouring nodes of (1, C, K, h', w'), along the two in-plane
    axes (normalised units): the smoothness term of the refinement."""
    return sum((in_plane.narrow(dim, 1, in_plane.shape[dim] - 1)
                - in_plane.narrow(dim, 0, in_plane.shape[dim] - 1)).pow(2).mean() for dim in (3, 4))


def refine_slices(forward, fixed, moving, planes, axis=0, similarity="lncc", steps=None, progress=None):
    """In-plane corrections of every fixed slice: ``(correction on the network grid, report)``.

    ``forward``: (1, 3, D, H, W) normalised fixed-to-moving displacement on the network grid;
    ``fixed``, ``moving``: (1, 1, K, J, I) tensors on the fixed image's grid, normalised, the moving
    image resampled there through the affine (in the contrast ``similarity`` compares: 'lncc' or
    'squared_lncc', :data:`fmsam.losses.SIMILARITIES`); ``axis``: the slice axis (0, 1, 2 of
    (k, j, i), :func:`stack_axis`); ``planes``: :func:`plane_shape`. The network grid and the fixed
    grid span the same extent (first and last voxel centres at -1 and 1).

    The correction is a (1, 3, D, H, W) normalised displacement ``c`` with no component along the
    slice axis; the refined field is ``compose(forward, c)``. ``report``: the loss before the first
    step and after the last (the fold term included since 2026-12-04 late night: not comparable with
    reports from before), the steps, the planes' shape and the axis. ``progress(fraction)`` after
    every step. ``steps``: Adam steps, default :data:`STEPS` as it is at the call (so that a caller
    that changes the constant, as ``cardiac_diagnostics.py engine-settings`` does, changes them).
    """
    import torch
    import torch.nn.functional as F

    from .instance_optimisation import adam_steps
    from .jacobian import grid_determinant
    from .layers import identity_grid, resize, sample_at
    from .losses import local_ncc_loss

    steps = STEPS if steps is None else int(steps)
    count, height, width = planes
    if fixed.shape[2 + axis] != count or count < 2:
        raise ValueError("refine_slices needs the fixed stack's %d slices (at least 2), not %d"
                         % (count, fixed.shape[2 + axis]))
    forward = to_stack_layout(forward, axis, displacement=True)
    fixed, moving = to_stack_layout(fixed, axis), to_stack_layout(moving, axis)
    fixed_planes = resize(fixed, planes)
    moving_planes = resize(moving, planes)
    points = identity_grid(planes, device=forward.device)            # (1, K, h, w, 3), z at each slice
    nodes = (count, max(2, (height - 1) // NODE_STRIDE + 1), max(2, (width - 1) // NODE_STRIDE + 1))
    in_plane = torch.zeros((1, 2) + nodes, device=forward.device, requires_grad=True)
    optimiser = torch.optim.Adam([in_plane], lr=LEARNING_RATE)
    squared = similarity == "squared_lncc"
    window = (1, WINDOW, WINDOW)

    with torch.no_grad():  # each slice of the moving image as the network's field maps it
        network_at_planes = sample_at(forward, points, padding_mode="border")            # (1, 3, K, h, w)
        on_planes = points + network_at_planes.permute(0, 2, 3, 4, 1)
        warped_planes = sample_at(moving_planes, on_planes)[0].transpose(0, 1).contiguous()  # (K, 1, h, w)
        network_planes = network_at_planes[0].transpose(0, 1).contiguous()                 # (K, 3, h, w)
    in_slice = points[:, 0, ..., :2]                                  # (1, h, w, 2): x, y of every slice
    to_voxels = torch.tensor([(width - 1) / 2.0 / FOLD_STRIDE, (height - 1) / 2.0 / FOLD_STRIDE, (count - 1) / 2.0],
                             device=forward.device).view(1, 3, 1, 1, 1)  # normalised -> fold-term voxels, slices

    def fold_term(correction, moved):
        # det J of p -> p + c(p) + forward(p + c(p)) on the (K, h, w) grid of the planes, in its voxels
        # (the determinant of a map is the same in any grid's units).
        correction = correction[:, :, ::FOLD_STRIDE, ::FOLD_STRIDE]
        network_at = F.grid_sample(network_planes, moved[:, ::FOLD_STRIDE, ::FOLD_STRIDE], mode="bilinear",
                                   padding_mode="border", align_corners=True)               # (K, 3, h', w')
        composed = network_at + torch.cat([correction, torch.zeros_like(correction[:, :1])], dim=1)
        determinant = grid_determinant(composed.transpose(0, 1)[None] * to_voxels, "corners")
        return torch.relu(FOLD_MARGIN - determinant).pow(2).mean()

    def loss_now():
        # The corrections move points within their slice, where warped_planes already holds
        # moving(q + forward(q)): sampling it at p + u(p) is moving(p + u + forward(p + u)). Each
        # slice is one item of the 2-D sampler (bilinear, in parallel over slices): the same as
        # the 3-D sampler at the slice's own z, at a fraction of its cost.
        correction = F.interpolate(in_plane[0].transpose(0, 1), size=(height, width), mode="bilinear",
                                   align_corners=True)                                     # (K, 2, h, w)
        moved = in_slice + correction.permute(0, 2, 3, 1)
        warped = F.grid_sample(warped_planes, moved, mode="bilinear", padding_mode="border",
                               align_corners=True)                                         # (K, 1, h, w)
        loss = (local_ncc_loss(fixed_planes, warped.transpose(0, 1)[None], window, squared=squared)
                + REGULARISATION * node_roughness(in_plane))
        return (loss + FOLD_WEIGHT * fold_term(correction, moved)) if FOLD_WEIGHT > 0 else loss

    losses = adam_steps(loss_now, optimiser, steps, progress)
    with torch.no_grad():
        losses.append(float(loss_now()))
        depth = forward.shape[2]
        lower, upper, weight = between_slices(count, depth, forward.device)
        solved, weight = in_plane.detach(), weight.view(1, 1, depth, 1, 1)
        per_plane = solved[:, :, lower] * (1.0 - weight) + solved[:, :, upper] * weight
        correction = without_slice_displacement(per_plane, forward.shape[2:])
        correction = from_stack_layout(correction, axis, displacement=True)
    report = {"slice_refinement": {"applied": True, "steps": int(steps), "planes": list(planes), "axis": int(axis),
                                   "loss_before": round(losses[0], 5), "loss_after": round(losses[-1], 5)}}
    return correction, report
