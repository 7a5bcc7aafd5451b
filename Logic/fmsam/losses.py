"""Training and instance-optimisation losses: local NCC similarity, GradICON regularisation, and
label overlap (for training pairs rendered from label maps)."""
import torch
import torch.nn.functional as F

from .layers import compose, identity_grid, normalised_to_voxels, sample_at, warp


#: Similarities of :func:`symmetric_registration_loss`: the signed local NCC the network was trained
#: with, and its square, which does not care about the sign of the local correlation (contrast-
#: independent; multiGradICON's choice for pairs of different contrasts).
SIMILARITIES = ("lncc", "squared_lncc")


def local_ncc_loss(fixed, warped, window=5, eps=1e-7, squared=False):
    """1 - mean local normalised cross-correlation over ``window``^3 boxes (0 = identical images,
    2 = locally inverted contrast). Inputs: (N, 1, D, H, W) in [0, 1]. ``window``: odd voxels per
    axis, one int for a cube or (D, H, W), e.g. (1, 9, 9) for boxes within each plane (slice
    refinement). ``squared``: 1 - mean of the squared local correlation instead (0 for identical
    and for locally inverted images, 1 for unrelated ones), for instance optimisation of pairs whose
    contrasts differ.

    The correlation is signed on purpose: the squared version (1 - LNCC^2) also rewards
    anti-correlation, so in misaligned regions it pulled bright edges onto dark ones; trained with
    it, the network improved the similarity while label overlap fell.

    ``eps`` sits between the variance products of the two kinds of region: tissue (local variances
    about 1e-3, products about 1e-6) keeps its full correlation, while background noise (variances
    about 1e-5 or less, products 1e-10) is damped towards zero. A larger eps (1e-5, right for
    voxelmorph's window *sums*) flattened the loss over tissue and stalled training.
    """
    if isinstance(window, int):
        def box_mean(volume):
            return F.avg_pool3d(volume, window, stride=1, padding=window // 2, count_include_pad=False)
    else:
        # One axis at a time, by cumulative sums: the mean over a box cut by the border is the
        # product of the per-axis means, so this equals 3-D average pooling (to rounding) at a
        # fraction of its cost.
        def box_mean(volume):
            for axis, width in enumerate(window):
                if width > 1:
                    volume = box_mean_along(volume, 2 + axis, width)
            return volume

    mean_f, mean_w = box_mean(fixed), box_mean(warped)
    cross = box_mean(fixed * warped) - mean_f * mean_w
    var_f = (box_mean(fixed * fixed) - mean_f * mean_f).clamp_min(0.0)
    var_w = (box_mean(warped * warped) - mean_w * mean_w).clamp_min(0.0)
    correlation = cross / torch.sqrt(var_f * var_w + eps)
    return 1.0 - (correlation * correlation if squared else correlation).mean()


def box_mean_along(volume, dim, width):
    """Mean of ``volume`` over ``width`` (odd) neighbours along ``dim``, the box cut by the border
    (as average pooling with ``count_include_pad=False``), by cumulative sums: the cost does not
    grow with ``width``, nor does its gradient's (a cumulative sum the other way). In float32 the
    means differ from pooling's by rounding (about 1e-6 for images in [0, 1] and 250 voxels along
    ``dim``)."""
    count, radius = volume.shape[dim], width // 2
    sums = torch.cumsum(volume, dim)
    before = list(sums.shape)
    before[dim] = radius + 1
    after = list(sums.shape)
    after[dim] = radius
    last = sums.narrow(dim, count - 1, 1)
    # padded[n] = sum of volume[0 .. n - radius - 1] (0 before the start, the total past the end)
    padded = torch.cat([sums.new_zeros(before), sums, last.expand(after)], dim)
    totals = padded.narrow(dim, 2 * radius + 1, count) - padded.narrow(dim, 0, count)
    index = torch.arange(count, device=volume.device)
    members = (index + radius + 1).clamp(max=count) - (index - radius).clamp(min=0)
    shape = [1] * volume.dim()
    shape[dim] = count
    return totals / members.to(volume.dtype).view(shape)


def gradient_inverse_consistency(forward, backward):
    """GradICON penalty: how far the Jacobian of ``forward o backward`` is from the identity.

    ``forward`` maps fixed to moving and ``backward`` moving to fixed (normalised displacements on
    the same grid). The composition's displacement is differentiated by forward differences in
    voxel units; the result is the squared Frobenius norm of (J - I), divided by 3 as in GradICON,
    averaged over voxels.
    """
    residual = normalised_to_voxels(compose(forward, backward))
    total = 0.0
    for axis in (2, 3, 4):
        difference = residual.narrow(axis, 1, residual.shape[axis] - 1) - \
            residual.narrow(axis, 0, residual.shape[axis] - 1)
        total = total + difference.pow(2).sum(dim=1).mean()
    return total / 3.0


def random_subvoxel_offset(shape, generator=None):
    """A random shift of up to half a voxel along each axis of a (D, H, W) grid, in normalised
    coordinates (x, y, z), for :func:`jittered_similarity`."""
    voxels = torch.rand(3, generator=generator) - 0.5
    sizes = torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float32)
    return voxels * 2.0 / (sizes - 1).clamp_min(1.0)


def jittered_similarity(fixed, moving, displacement, offset=None, window=5, similarity="lncc"):
    """Local NCC of ``fixed`` and ``moving`` warped by ``displacement``, both sampled on the voxel
    grid shifted by ``offset`` (normalised x, y, z; None = no shift).

    Trilinear interpolation is only piecewise linear: at exactly voxel-centred points (zero
    displacement, where every field starts) its derivative is a one-sided difference, and
    floating-point rounding decides the side. Summed over a volume that bias is coherent, and a
    network trained on it learned a spurious half-voxel global shift. Sampling on a randomly shifted
    grid makes the gradient unbiased on average. ``similarity``: one of :data:`SIMILARITIES`.
    """
    if similarity not in SIMILARITIES:
        raise ValueError("similarity must be one of %s, not %r" % (", ".join(SIMILARITIES), similarity))
    squared = similarity == "squared_lncc"
    if offset is None:
        return local_ncc_loss(fixed, warp(moving, displacement), window, squared=squared)
    grid = identity_grid(fixed.shape[2:], fixed.device, fixed.dtype) + \
        offset.to(fixed.device, fixed.dtype).view(1, 1, 1, 1, 3)
    grid = grid.expand(fixed.shape[0], -1, -1, -1, -1)
    fixed_sampled = sample_at(fixed, grid, padding_mode="border")
    displacement_sampled = sample_at(displacement, grid, padding_mode="border")
    warped = sample_at(moving, grid + displacement_sampled.permute(0, 2, 3, 4, 1))
    return local_ncc_loss(fixed_sampled, warped, window, squared=squared)


def symmetric_registration_loss(fixed, moving, forward, backward, gradicon_weight=1.5, window=5,
                                offset=None, similarity="lncc"):
    """Loss of one pair registered both ways (the uniGradICON objective).

    ``forward`` = network(fixed, moving), ``backward`` = network(moving, fixed); ``offset``: the
    sub-voxel sampling shift of :func:`jittered_similarity` (draw a new one every step);
    ``similarity``: one of :data:`SIMILARITIES`. Returns ``(loss, similarity, regulariser)``.
    """
    kind = similarity
    similarity = jittered_similarity(fixed, moving, forward, offset, window, kind) + \
        jittered_similarity(moving, fixed, backward, offset, window, kind)
    regulariser = gradient_inverse_consistency(forward, backward) + \
        gradient_inverse_consistency(backward, forward)
    return similarity + gradicon_weight * regulariser, similarity, regulariser


def label_overlap_loss(fixed_labels, moving_labels, forward, backward):
    """1 - mean soft Dice of the label maps carried by the fields, both ways (SynthMorph's
    supervision, for training pairs rendered from label maps).

    ``fixed_labels``, ``moving_labels``: (1, 1, D, H, W) integer-valued label maps on the fields'
    grid (0 = background); ``forward`` = network(fixed, moving) and ``backward`` = network(moving,
    fixed), normalised displacements (1, 3, D, H, W). The moving map's one-hot channels are warped
    by ``forward`` (trilinear, so the loss is differentiable in the field) and compared with the
    fixed map's, and the other way round with ``backward``. Averaged over the foreground labels
    present in either map; 0 = perfect overlap, 1 = none. No foreground at all gives 0.
    """
    count = int(max(fixed_labels.max().item(), moving_labels.max().item())) + 1
    fixed_hot = F.one_hot(fixed_labels[:, 0].long(), count).permute(0, 4, 1, 2, 3).to(forward.dtype)
    moving_hot = F.one_hot(moving_labels[:, 0].long(), count).permute(0, 4, 1, 2, 3).to(forward.dtype)
    present = (fixed_hot.sum(dim=(0, 2, 3, 4)) + moving_hot.sum(dim=(0, 2, 3, 4)))[1:] > 0
    if not bool(present.any()):
        return forward.new_zeros(())

    def dice(target, warped):
        overlap = (target * warped).sum(dim=(0, 2, 3, 4))[1:]
        size = (target.sum(dim=(0, 2, 3, 4)) + warped.sum(dim=(0, 2, 3, 4)))[1:]
        return (2.0 * overlap / size.clamp_min(1e-6))[present].mean()

    return 1.0 - 0.5 * (dice(fixed_hot, warp(moving_hot, forward)) + dice(moving_hot, warp(fixed_hot, backward)))
