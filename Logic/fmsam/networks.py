"""Registration networks: a plain 3D U-Net and the two-step (coarse-to-fine) model built from it.

Inputs are intensity-normalised images in [0, 1] on the network grid, shape ``(N, 1, D, H, W)``.
Outputs are normalised displacements ``(N, 3, D, H, W)`` (see :mod:`fmsam.layers`). There is no
batch normalisation: its running statistics would be corrupted by SAM's perturbed pass and it makes
single-pair inference depend on the batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import compose, resize, voxels_to_normalised, warp


def _conv(in_channels, out_channels, stride=1):
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2))


class UNet(nn.Module):
    """U-Net predicting a displacement from a (fixed, moving) pair stacked as 2 channels.

    ``channels[0]`` features at full resolution, each further entry one level down (stride 2).
    The last layer starts at zero, so an untrained network is the identity map. It predicts voxels
    of its input grid, converted to normalised coordinates on output: a weight step then moves the
    field by a similar number of voxels on any grid, instead of 40 times less on an 80-voxel axis.
    """

    def __init__(self, channels=(16, 32, 32, 64)):
        super().__init__()
        channels = list(channels)
        self.encoder_input = _conv(2, channels[0])
        self.down = nn.ModuleList(_conv(channels[i], channels[i + 1], stride=2)
                                  for i in range(len(channels) - 1))
        self.up = nn.ModuleList(_conv(channels[i + 1] + channels[i], channels[i])
                                for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv3d(channels[0], 3, 3, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed, moving):
        features = [self.encoder_input(torch.cat([fixed, moving], dim=1))]
        for layer in self.down:
            features.append(layer(features[-1]))
        x = features[-1]
        for layer, skip in zip(self.up, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=True)
            x = layer(torch.cat([x, skip], dim=1))
        return voxels_to_normalised(self.head(x))


class TwoStepNet(nn.Module):
    """uniGradICON-style two-step model: a coarse U-Net at half resolution, then a full-resolution
    U-Net that refines the coarsely warped pair; the two maps are composed (coarse after fine)."""

    def __init__(self, coarse_channels=(16, 32, 64, 64), fine_channels=(16, 32, 32, 64)):
        super().__init__()
        self.coarse = UNet(coarse_channels)
        self.fine = UNet(fine_channels)

    def forward(self, fixed, moving):
        full_shape = fixed.shape[2:]
        half_shape = [max(2, (n + 1) // 2) for n in full_shape]
        coarse = self.coarse(resize(fixed, half_shape), resize(moving, half_shape))
        coarse = resize(coarse, full_shape)
        fine = self.fine(fixed, warp(moving, coarse))
        return compose(coarse, fine)


def build_network(config):
    """Create the network a weights file describes (``config['architecture']`` and its options)."""
    architecture = config.get("architecture", "TwoStepNet")
    if architecture == "TwoStepNet":
        return TwoStepNet(tuple(config["coarse_channels"]), tuple(config["fine_channels"]))
    if architecture == "UNet":
        return UNet(tuple(config["channels"]))
    raise ValueError("unknown network architecture %r" % architecture)


def network_grid_shape(extent_mm_kji, voxels=64 * 80 * 80, multiple=8):
    """Network grid (D, H, W) for an image of physical extent (k, j, i) in mm.

    The grid keeps the image's physical aspect ratio at about ``voxels`` voxels, each axis a multiple
    of ``multiple`` so the U-Net's stride-2 levels divide evenly. For a 2 mm IXI head
    (180 x 240 x 240 mm) this gives (64, 80, 80), the grid the bundled model was trained on.
    """
    extent = [max(float(e), 1e-6) for e in extent_mm_kji]
    scale = (voxels / (extent[0] * extent[1] * extent[2])) ** (1.0 / 3.0)
    return tuple(max(multiple, int(round(e * scale / multiple)) * multiple) for e in extent)
