"""Training and instance-optimisation losses: local NCC similarity and GradICON regularisation."""
import torch
import torch.nn.functional as F

from .layers import compose, normalised_to_voxels, warp


def local_ncc_loss(fixed, warped, window=5, eps=1e-5):
    """1 - mean squared local normalised cross-correlation over ``window``^3 boxes.

    Squared correlation ignores the sign of the contrast, so an inverted or different MR contrast
    still aligns. Inputs: (N, 1, D, H, W). Returns a scalar in [0, 1].
    """
    def box_mean(volume):
        return F.avg_pool3d(volume, window, stride=1, padding=window // 2, count_include_pad=False)

    mean_f, mean_w = box_mean(fixed), box_mean(warped)
    cross = box_mean(fixed * warped) - mean_f * mean_w
    var_f = (box_mean(fixed * fixed) - mean_f * mean_f).clamp_min(0.0)
    var_w = (box_mean(warped * warped) - mean_w * mean_w).clamp_min(0.0)
    correlation = cross * cross / (var_f * var_w + eps)
    return 1.0 - correlation.mean()


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


def symmetric_registration_loss(fixed, moving, forward, backward, gradicon_weight=1.5, window=5):
    """Loss of one pair registered both ways (the uniGradICON objective).

    ``forward`` = network(fixed, moving), ``backward`` = network(moving, fixed). Returns
    ``(loss, similarity, regulariser)``.
    """
    similarity = local_ncc_loss(fixed, warp(moving, forward), window) + \
        local_ncc_loss(moving, warp(fixed, backward), window)
    regulariser = gradient_inverse_consistency(forward, backward) + \
        gradient_inverse_consistency(backward, forward)
    return similarity + gradicon_weight * regulariser, similarity, regulariser
