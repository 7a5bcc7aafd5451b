"""SynthMorph-style synthetic training pairs: shapes without any particular contrast.

Following Hoffmann et al. (SynthMorph, IEEE TMI 2022): a random label map is made from smoothed
noise (argmax over label channels); the moving label map is the same map through a random smooth
deformation; both maps are *rendered* with one random palette (a mean and spread per label) and
each with its own smooth multiplicative bias field, blur, noise and gamma. Every pair has a new
palette, so the network meets many contrasts; within a pair the contrast is shared because our loss
is local correlation of the two images, which has nothing to reward when a label is bright in one
image and dark in the other (SynthMorph renders the two images independently and trains on label
overlap instead). Pairs of different contrasts are the job of :mod:`fmsam.contrast` at inference.

All tensors are (1, 1, D, H, W) float32 in [0, 1] on the network grid; every draw comes from the
given ``torch.Generator`` (seeded by the training step, so resumed runs draw the same pairs).
"""
import torch

from fmsam.layers import resize, warp


def _smooth_noise(generator, channels, shape, coarseness):
    """Random fields smooth at the scale of ``shape / coarseness`` voxels: (1, C, D, H, W)."""
    low = [max(2, int(round(size / coarseness))) for size in shape]
    return resize(torch.randn((1, channels) + tuple(low), generator=generator), shape)


def random_label_map(generator, shape, labels=16):
    """(1, 1, D, H, W) integer-valued float label map with up to ``labels`` smooth blobs."""
    coarseness = 4.0 + 4.0 * torch.rand(1, generator=generator).item()
    return _smooth_noise(generator, labels, shape, coarseness).argmax(dim=1, keepdim=True).float()


def random_deformation(generator, shape, max_voxels=4.0):
    """A smooth random displacement (1, 3, D, H, W) in normalised units, up to ``max_voxels``."""
    strength = max_voxels * torch.rand(1, generator=generator).item()
    field = _smooth_noise(generator, 3, shape, 8.0)
    field = field / (field.abs().amax() + 1e-6) * strength
    half_extent = torch.tensor([(size - 1) / 2.0 for size in reversed(shape)]).view(1, 3, 1, 1, 1)
    return field / half_extent  # channels x, y, z follow the W, H, D axes


def random_palette(generator, labels=16):
    """``(means, spreads)`` of the intensity of each label, shape (labels,) each."""
    return torch.rand(labels, generator=generator), 0.05 * torch.rand(labels, generator=generator)


def render(generator, label_map, palette):
    """An image of a label map in the given palette with a random bias field, blur, noise and gamma."""
    shape = label_map.shape[2:]
    index = label_map.long()
    means, spreads = palette
    image = means[index] + spreads[index] * torch.randn(index.shape, generator=generator)
    bias = torch.exp(0.3 * _smooth_noise(generator, 1, shape, 16.0))
    image = image * bias
    blur = 1.0 + torch.rand(1, generator=generator).item()       # keep between 1 and 2 grid voxels
    low = [max(2, int(round(size / blur))) for size in shape]
    image = resize(resize(image, low), shape)
    image = image + 0.03 * torch.rand(1, generator=generator).item() * torch.randn(image.shape, generator=generator)
    image = image - image.amin()
    image = image / (image.amax() + 1e-6)
    gamma = torch.exp(torch.empty(1).uniform_(-0.35, 0.35, generator=generator)).item()
    return image.clamp_min(0).pow(gamma).float()


def synth_pair(generator, shape, labels=16, with_labels=False):
    """(fixed, moving): one random anatomy in one random palette, the moving one deformed. With
    ``with_labels``, also the two label maps: ``(fixed, moving, fixed_labels, moving_labels)``
    (same draws, so the images are the same either way)."""
    fixed_labels = random_label_map(generator, shape, labels)
    moving_labels = warp(fixed_labels, random_deformation(generator, shape), mode="nearest")
    palette = random_palette(generator, labels)
    fixed, moving = render(generator, fixed_labels, palette), render(generator, moving_labels, palette)
    return (fixed, moving, fixed_labels, moving_labels) if with_labels else (fixed, moving)


__all__ = ["synth_pair", "random_label_map", "random_deformation", "random_palette", "render"]
