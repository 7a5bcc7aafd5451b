"""Training data: cached template-aligned IXI subjects on the network grid, random pairs, augmentation.

Every random draw comes from a generator seeded by (seed, step), so a resumed run draws exactly the
pairs and augmentations the uninterrupted run would have drawn.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from fmsam.layers import resize, warp
from fmsam.losses import random_subvoxel_offset


class SubjectCache:
    """Images (float32, [0, 1]) of cached subjects resized to the network grid, and optionally
    their label maps at the cache's full resolution (``with_labels``, for validation Dice, int64)
    or on the network grid (``training_labels``, :func:`labels_on_grid`, int16: for label
    supervision of training pairs)."""

    def __init__(self, cache_dir, subjects, grid_shape, with_labels=False, training_labels=False):
        self.subjects = list(subjects)
        images, labels = [], []
        for subject in self.subjects:
            data = np.load(os.path.join(cache_dir, subject + ".npz"))
            image = torch.from_numpy(data["image"].astype(np.float32))[None, None]
            images.append(resize(image, grid_shape)[0])
            if training_labels:
                label_map = data["labels"]  # an npz member is decompressed on every access
                if label_map.size and not 0 <= int(label_map.min()) <= int(label_map.max()) <= 32767:
                    raise ValueError("%s: label values must lie in 0..32767 (stored as int16)" % subject)
                label_map = torch.from_numpy(label_map.astype(np.float32))[None, None]
                labels.append(labels_on_grid(label_map, grid_shape)[0].to(torch.int16))
            elif with_labels:
                labels.append(torch.from_numpy(data["labels"].astype(np.int64))[None])
        self.images = torch.stack(images)          # (S, 1, D, H, W)
        self.labels = torch.stack(labels) if (with_labels or training_labels) else None

    def __len__(self):
        return len(self.subjects)


def labels_on_grid(labels, grid, box=None):
    """A label map (1, 1, D', H', W') (optionally cropped to ``box`` = (start, size) per axis) sampled
    by nearest neighbour on a (D, H, W) grid over the same extent (first and last voxel centres kept,
    as ``fmsam.layers.resize`` puts the images): float (1, 1, D, H, W)."""
    if box is not None:
        labels = labels[(slice(None), slice(None)) + tuple(slice(s, s + n) for s, n in box)]
    return warp(labels.float(), torch.zeros((1, 3) + tuple(grid)), mode="nearest")


def read_split(cache_dir):
    with open(os.path.join(cache_dir, "template.json")) as handle:
        return json.load(handle)


def _random_affine_grid(generator, shape, max_degrees, max_scale, max_shift, extent_mm=None):
    """A random affine sampling grid (1, D, H, W, 3) in normalised coordinates: rotation (up to
    ``max_degrees`` per axis), scaling and shift (fraction of each half-extent). Draws 3 + 3 + 3
    uniforms from ``generator``.

    ``extent_mm`` (D, H, W physical extent): normalised coordinates stretch every axis to [-1, 1],
    so a rotation drawn there is a strong shear on a thin stack (350 x 350 x 60 mm); with the
    extent the matrix is drawn in mm and conjugated by the half-extents, ``theta = S^-1 R S``."""
    def uniform(low, high, n=3):
        return low + (high - low) * torch.rand(n, generator=generator)

    angles = uniform(-max_degrees, max_degrees) * math.pi / 180.0
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    rotate_x = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rotate_y = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rotate_z = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = rotate_z @ rotate_y @ rotate_x @ torch.diag(uniform(1 - max_scale, 1 + max_scale))
    if extent_mm is not None:
        half = torch.tensor([float(e) / 2.0 for e in reversed(extent_mm)])  # x, y, z = W, H, D
        matrix = torch.diag(1.0 / half) @ matrix @ torch.diag(half)
    theta = torch.cat([matrix, uniform(-max_shift, max_shift).view(3, 1)], dim=1)
    return F.affine_grid(theta[None].float(), (1, 1) + tuple(shape), align_corners=True)


def sample_pair(cache, seed, step, augment=True, with_labels=False):
    """Draw the (fixed, moving) pair for a training step: two distinct subjects, a joint flip along
    the array's last axis (anterior-posterior for IXI's PSR layout), a small random affine on the moving image, and random gamma on each image.

    With ``with_labels`` (a cache built with ``training_labels``), returns ``(fixed, moving,
    fixed_labels, moving_labels)``: the two subjects' label maps (float, (1, 1, D, H, W)) flipped
    and moved like the images (nearest neighbour); same draws and images as without."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    first, second = torch.randperm(len(cache), generator=generator)[:2].tolist()
    fixed = cache.images[first:first + 1].clone()
    moving = cache.images[second:second + 1].clone()
    labels = (cache.labels[first:first + 1].float(), cache.labels[second:second + 1].float()) if with_labels else ()
    if not augment:
        return (fixed, moving) + labels
    if torch.rand(1, generator=generator).item() < 0.5:
        fixed, moving = fixed.flip(-1), moving.flip(-1)
        labels = tuple(label.flip(-1) for label in labels)
    grid = _random_affine_grid(generator, moving.shape[2:], 8.0, 0.08, 0.06)
    moving = F.grid_sample(moving, grid, align_corners=True)
    if labels:
        labels = (labels[0], F.grid_sample(labels[1], grid, mode="nearest", align_corners=True))
    gammas = torch.exp(torch.empty(2).uniform_(-0.35, 0.35, generator=generator))
    return (fixed.clamp_min(0).pow(gammas[0]), moving.clamp_min(0).pow(gammas[1])) + labels


def label_subset(fixed_labels, moving_labels, count, generator):
    """The two label maps with ``count`` labels kept (drawn from ``generator`` among the foreground
    labels present in both) and renumbered 1..count, every other voxel 0: label supervision of a
    149-label brain parcellation at the cost of ``count`` labels (the loss's one-hot maps grow with
    the number of labels). Maps: (1, 1, D, H, W) float; returns the same, or None when the two share
    no foreground label (nothing to supervise: the step is then logged without a label loss)."""
    both = np.intersect1d(torch.unique(fixed_labels).numpy(), torch.unique(moving_labels).numpy())
    both = torch.from_numpy(both[both > 0])
    if len(both) == 0:
        return None
    chosen = both[torch.randperm(len(both), generator=generator)[:count]]
    lookup = torch.zeros(int(max(fixed_labels.max().item(), moving_labels.max().item())) + 1)
    lookup[chosen.long()] = torch.arange(1, len(chosen) + 1, dtype=lookup.dtype)
    return lookup[fixed_labels.long()], lookup[moving_labels.long()]


def sampling_offset(seed, step, shape):
    """The step's sub-voxel shift of the similarity's sampling grid (see fmsam.losses)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 500_000_000)
    return random_subvoxel_offset(shape, generator)


def thick_slices(image, generator, factors=(2.0, 3.5)):
    """The image as a thick-slice acquisition would give it, back on its own grid: along one random
    axis, voxels averaged in slabs ``factor`` voxels thick (factor uniform in ``factors``), then
    linearly interpolated. On the 2.25 mm network grid, 6 mm clinical slices are a factor of about 2.7.
    ``image``: (1, 1, D, H, W)."""
    axis = int(torch.randint(0, 3, (1,), generator=generator))
    factor = factors[0] + (factors[1] - factors[0]) * torch.rand(1, generator=generator).item()
    shape = list(image.shape[2:])
    low = list(shape)
    low[axis] = max(2, int(round(shape[axis] / factor)))
    return resize(F.adaptive_avg_pool3d(image, low), shape)


def skull_stripped(image, labels, margin=1):
    """``image`` with every voxel farther than ``margin`` voxels (cube neighbourhood) from a labelled
    one set to 0: a brain extraction as published templates and many pipelines' images have it (the
    brain and a rim of CSF kept, skull, scalp and neck gone). ``image``, ``labels``: (1, 1, D, H, W)
    on one grid (labels: the full parcellation, 0 = background)."""
    brain = (labels > 0).float()
    if margin > 0:
        brain = F.max_pool3d(brain, 2 * margin + 1, stride=1, padding=margin)
    return image * brain


def random_intensity_curve(generator, points=6):
    """A random smooth lookup ``[0, 1] -> [0, 1]`` that keeps 0 at 0 (background stays dark), as
    ``(x, y)`` control points for linear interpolation: any tissue order, so also inverted contrast."""
    x = torch.linspace(0.0, 1.0, points)
    y = torch.rand(points, generator=generator)
    y[0] = 0.0
    return x, y


def apply_intensity_curve(image, curve):
    """``image`` (values in [0, 1]) through a curve from :func:`random_intensity_curve`, rescaled to
    [0, 1]."""
    x, y = curve
    values = image.clamp(0.0, 1.0) * (len(x) - 1)
    lower = values.floor().long().clamp(max=len(x) - 2)
    weight = values - lower
    mapped = y[lower] * (1 - weight) + y[lower + 1] * weight
    return mapped / mapped.amax().clamp_min(1e-6)
