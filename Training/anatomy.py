"""Training pairs beyond brains: real cardiac MR stacks and synthetic images of real abdominal anatomy.

Both are presented to the network the way :func:`fmsam.pipeline.register` presents an image pair:
reoriented to the training layout (``fmsam.pipeline.TRAINING_ORIENTATION``, PSR) by an exact axis
permutation, normalised by :func:`fmsam.intensity.normalise`, the moving image resampled onto the
fixed image's grid, contrast-matched when the engine would match it (:mod:`fmsam.contrast`), and both
resized to the network grid :func:`fmsam.inference.grid_for` gives the fixed image at the training
grid's voxel budget (:func:`network_grid`). So a pair's grid keeps its physical aspect ratio and
changes from step to step: a 350 x 350 x 60 mm short-axis stack gets (168, 168, 32) on the
80x100x100 budget, where a brain gets (80, 100, 100). The network is fully convolutional (its U-Nets
interpolate to each skip connection's size, ``fmsam.networks``), so it trains on any grid; per-step
grids are what inference uses, so training sees exactly the geometry inference will show it.

Every random draw comes from the ``torch.Generator`` passed in (seeded by the training step), so a
resumed run draws the same pairs. Tensors are (1, 1, D, H, W) float32 in [0, 1] on the pair's
network grid; ``D, H, W`` are the array axes k, j, i of the PSR-reoriented fixed image.
"""
import os

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from fmsam import fields
from fmsam.contrast import DECISION_SAMPLING, MIN_CORRELATION_GAIN, apply_lookup, contrast_decision
from fmsam.inference import grid_for, to_network_grid
from fmsam.layers import resize, warp
from fmsam.geometry import reorient
from fmsam.intensity import normalised_image
from fmsam.pipeline import TRAINING_ORIENTATION
from synth import random_deformation, random_palette, render
from training_data import _random_affine_grid, labels_on_grid

SEQUENCES = ("C0", "DE", "T2")


def network_grid(extent_mm_kji, budget_grid):
    """The engine's network grid (D, H, W) for an image of physical extent (k, j, i) in mm, at the
    voxel budget of ``budget_grid`` (the trainer's ``--grid``): :func:`fmsam.inference.grid_for` on
    a one-voxel probe image of that extent, so any rule the engine adds (such as a minimum number of
    voxels per axis) applies to training too; the raised budget of images with many voxels does not
    (the probe has one voxel), so training keeps its ``--grid`` budget."""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetSpacing([float(e) for e in reversed(extent_mm_kji)])
    return tuple(int(n) for n in grid_for(probe, {"grid": list(budget_grid)}))


def image_extent(image):
    """Physical extent (k, j, i) in mm of a SimpleITK image: size times spacing."""
    return tuple(float(n * s) for n, s in zip(reversed(image.GetSize()), reversed(image.GetSpacing())))


def random_affine_mm(generator, shape, extent_mm, max_degrees, max_scale, max_shift):
    """A random affine sampling grid (1, D, H, W, 3) drawn in mm for an image of physical extent
    ``extent_mm`` (D, H, W): see :func:`training_data._random_affine_grid`."""
    return _random_affine_grid(generator, shape, max_degrees, max_scale, max_shift, extent_mm=extent_mm)


def _gamma_pair(generator, fixed, moving):
    gammas = torch.exp(torch.empty(2).uniform_(-0.35, 0.35, generator=generator))
    return fixed.clamp_min(0).pow(gammas[0]), moving.clamp_min(0).pow(gammas[1])


# -- cardiac MR ----------------------------------------------------------------------------------

class CardiacSet:
    """Short-axis stacks (``<patient>_<sequence>.nii.gz``) of some MyoPS patients, each reoriented to
    the training layout and normalised as MR (SimpleITK float32 images in [0, 1], native grid, about
    0.73 mm in-plane, 2-6 slices 12-23 mm thick), with each image's intensity-weighted centre (LPS mm).
    """

    def __init__(self, folder, patients, sequences=SEQUENCES):
        self.patients = [int(p) for p in patients]
        self.sequences = tuple(sequences)
        self.images, self.centres = {}, {}
        for patient in self.patients:
            for sequence in self.sequences:
                image = sitk.ReadImage(os.path.join(folder, "%d_%s.nii.gz" % (patient, sequence)), sitk.sitkFloat32)
                image, _ = normalised_image(reorient(image, TRAINING_ORIENTATION), "mr")
                self.images[patient, sequence] = image
                self.centres[patient, sequence] = _intensity_centre(image)

    def __len__(self):
        return len(self.patients)


def _intensity_centre(image):
    """Intensity-weighted centre of a SimpleITK image, LPS mm."""
    voxels = sitk.GetArrayViewFromImage(image).astype(np.float64)
    total = max(float(voxels.sum()), 1e-12)
    index_kji = [float((voxels.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum()) / total
                 for axis, n in enumerate(voxels.shape)]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index_kji[::-1]))


def present_cardiac_pair(cardiac, fixed_key, moving_key, budget_grid):
    """``(fixed, moving, matched)`` of two stacks on the fixed stack's network grid, as the engine
    would present them: the moving stack resampled onto the fixed stack's grid (linear, 0 outside),
    through a translation that lines up the two intensity-weighted centres for two patients (one of
    the engine's pre-alignment candidates for thin stacks; identity for two sequences of one patient,
    acquired in one session), then contrast-matched to the fixed stack when the engine's rule says
    so (correlation gain >= ``fmsam.contrast.MIN_CORRELATION_GAIN``; cross-sequence pairs, a real
    multi-contrast case, pass through it and local NCC then compares like with like).
    Keys are ``(patient, sequence)``."""
    fixed_image, moving_image = cardiac.images[fixed_key], cardiac.images[moving_key]
    shift = np.zeros(3) if fixed_key[0] == moving_key[0] else cardiac.centres[moving_key] - cardiac.centres[fixed_key]
    transform = sitk.TranslationTransform(3, [float(v) for v in shift])
    moving_on_fixed = fields.resample(moving_image, fixed_image, transform)
    fixed_voxels = sitk.GetArrayViewFromImage(fixed_image)
    lookup, gain = contrast_decision(fixed_voxels[DECISION_SAMPLING],
                                     sitk.GetArrayViewFromImage(moving_on_fixed)[DECISION_SAMPLING])
    matched = gain >= MIN_CORRELATION_GAIN
    if matched:  # as the pipeline does: the lookup on the moving image, then resampled again
        moving_image = fields.image_on_grid(apply_lookup(lookup, sitk.GetArrayViewFromImage(moving_image)),
                                            moving_image)
        moving_on_fixed = fields.resample(moving_image, fixed_image, transform)
    grid = network_grid(image_extent(fixed_image), budget_grid)
    fixed = to_network_grid(fixed_voxels, grid, "cpu")
    moving = to_network_grid(sitk.GetArrayViewFromImage(moving_on_fixed), grid, "cpu")
    return fixed, moving, bool(matched)


def cardiac_pair(cardiac, generator, budget_grid, cross_sequence=0.5, augment=True):
    """A training pair of stacks: with chance ``cross_sequence`` two sequences of one patient, else
    one sequence of two patients; presented by :func:`present_cardiac_pair`, then (``augment``) a
    small random affine in mm on the moving image (5 degrees, 5 % scale, 4 % shift) and a random
    gamma on each. Returns ``(fixed, moving)``, (1, 1, D, H, W) on the fixed stack's network grid."""
    if torch.rand(1, generator=generator).item() < cross_sequence:
        patient = cardiac.patients[int(torch.randint(len(cardiac.patients), (1,), generator=generator))]
        first, second = torch.randperm(len(cardiac.sequences), generator=generator)[:2].tolist()
        fixed_key, moving_key = (patient, cardiac.sequences[first]), (patient, cardiac.sequences[second])
    else:
        sequence = cardiac.sequences[int(torch.randint(len(cardiac.sequences), (1,), generator=generator))]
        first, second = torch.randperm(len(cardiac.patients), generator=generator)[:2].tolist()
        fixed_key, moving_key = (cardiac.patients[first], sequence), (cardiac.patients[second], sequence)
    fixed, moving, _ = present_cardiac_pair(cardiac, fixed_key, moving_key, budget_grid)
    if not augment:
        return fixed, moving
    extent = image_extent(cardiac.images[fixed_key])
    moving = F.grid_sample(moving, random_affine_mm(generator, moving.shape[2:], extent, 5.0, 0.05, 0.04),
                           align_corners=True)
    return _gamma_pair(generator, fixed, moving)


def cardiac_validation_keys(patients, sequences=SEQUENCES):
    """Fixed selection pairs ``[(fixed key, moving key), ...]``: for each patient, the next patient
    (cyclically) in one sequence (C0, DE, T2 in turn); then DE to C0 of the first four patients
    (cross-sequence, contrast-matched)."""
    patients = [int(p) for p in patients]
    pairs = [((p, sequences[i % len(sequences)]), (patients[(i + 1) % len(patients)], sequences[i % len(sequences)]))
             for i, p in enumerate(patients) if len(patients) > 1]
    pairs += [((p, "C0"), (p, "DE")) for p in patients[:4] if {"C0", "DE"} <= set(sequences)]
    return pairs


# -- synthetic abdomen ---------------------------------------------------------------------------

#: CT-like mean Hounsfield units of the 13 organ labels (contrast-enhanced portal-venous phase,
#: rough textbook values), background first; each image draws its own within +-25 HU.
ORGAN_HU = (-60.0,  # 0 background: fat, muscle and bowel averaged
            50.0, 160.0, 160.0, 10.0, 40.0, 60.0, 25.0, 180.0, 150.0, 170.0, 40.0, 30.0, 30.0)


class AbdomenSet:
    """Abdominal CT label maps (0 background, 1-13 organs) reoriented to the training layout: each a
    (1, 1, D, H, W) uint8 tensor, with its voxel spacing (k, j, i) in mm (2 mm for the shared maps)."""

    def __init__(self, folder, map_ids):
        self.ids = [str(m) for m in map_ids]
        self.maps, self.spacings = [], []
        for map_id in self.ids:
            labels = reorient(sitk.ReadImage(os.path.join(folder, map_id + ".nii.gz")), TRAINING_ORIENTATION)
            self.maps.append(torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.uint8))[None, None])
            self.spacings.append(tuple(reversed(labels.GetSpacing())))

    def __len__(self):
        return len(self.ids)


def render_ct_hounsfield(generator, label_map, hu_means, noise_hu):
    """A CT-like image of a label map in Hounsfield units: each label at its mean HU plus Gaussian
    noise (``noise_hu``) and a 1-2 voxel blur. No bias field and no gamma (CT has a fixed scale).
    ``label_map``: (1, 1, D, H, W); ``hu_means``: (labels,) tensor. Returns float (1, 1, D, H, W)."""
    shape = label_map.shape[2:]
    index = label_map.long()
    image = hu_means[index] + noise_hu * torch.randn(index.shape, generator=generator)
    blur = 1.0 + torch.rand(1, generator=generator).item()
    return resize(resize(image, [max(2, int(round(n / blur))) for n in shape]), shape)


def render_ct(generator, label_map, hu_means, noise_hu):
    """:func:`render_ct_hounsfield` mapped to [0, 1] as the engine maps CT
    (:func:`fmsam.intensity.hounsfield_to_unit`), float32 (1, 1, D, H, W)."""
    from fmsam.intensity import hounsfield_to_unit

    image = render_ct_hounsfield(generator, label_map, hu_means, noise_hu)
    return torch.from_numpy(hounsfield_to_unit(image.numpy()))


def slab_average(image, axis, factor):
    """``image`` (1, 1, D, H, W) as a thick-slice acquisition along ``axis`` (0, 1, 2 = D, H, W) would
    give it on the same grid: slabs ``factor`` voxels thick averaged, then linearly interpolated."""
    shape = list(image.shape[2:])
    low = list(shape)
    low[axis] = max(2, int(round(shape[axis] / factor)))
    return resize(F.adaptive_avg_pool3d(image, low), shape)


def abdomen_pair(abdomen, generator, budget_grid, min_fraction=0.5, with_labels=False):
    """A training pair rendered from abdominal label maps, (fixed, moving) on the network grid of a
    random partial field of view.

    Draws, in order: inter-subject (two different maps, chance 0.5; the shared maps are roughly
    aligned to each other, as after an affine) or intra-subject (one map, the moving one through
    ``synth.random_deformation``, up to 4 network voxels); a crop box, ``min_fraction``-1 of each
    axis at a random place (the same box in both maps); a CT-like (chance 0.5: organ HU per
    :data:`ORGAN_HU` +-25, noise 5-25 HU, the engine's CT mapping) or MR-like contrast (``synth.random_palette``
    and ``synth.render``: bias field, blur, noise, gamma), one contrast for both images (local NCC
    needs a shared contrast; other contrasts are contrast matching's job at inference); the moving
    labels through a small random affine in mm (inter-subject only); then for each image, with
    chance 0.5, thick slices along one axis shared by the pair (2-8 mm slabs, i.e. anisotropic
    spacing, when thicker than the grid's voxels). With ``with_labels``, also the two label maps on
    the grid: ``(fixed, moving, fixed_labels, moving_labels)`` (same draws, same images)."""
    inter = len(abdomen) > 1 and torch.rand(1, generator=generator).item() < 0.5
    if inter:
        first, second = torch.randperm(len(abdomen), generator=generator)[:2].tolist()
    else:
        first = second = int(torch.randint(len(abdomen), (1,), generator=generator))
    full = [min(a, b) for a, b in zip(abdomen.maps[first].shape[2:], abdomen.maps[second].shape[2:])]
    sizes = [max(8, int(round(n * (min_fraction + (1 - min_fraction) * torch.rand(1, generator=generator).item()))))
             for n in full]
    box = [(int(torch.randint(n - s + 1, (1,), generator=generator)), s) for n, s in zip(full, sizes)]
    spacing = abdomen.spacings[first]
    extent = [s * d for s, d in zip(sizes, spacing)]
    grid = network_grid(extent, budget_grid)
    fixed_labels = labels_on_grid(abdomen.maps[first], grid, box)
    if inter:
        moving_labels = labels_on_grid(abdomen.maps[second], grid, box)
        affine = random_affine_mm(generator, grid, extent, 5.0, 0.05, 0.04)
        moving_labels = F.grid_sample(moving_labels, affine, mode="nearest", align_corners=True)
    else:
        moving_labels = warp(fixed_labels, random_deformation(generator, grid), mode="nearest")
    if torch.rand(1, generator=generator).item() < 0.5:
        hu = torch.tensor(ORGAN_HU) + 25.0 * (2 * torch.rand(len(ORGAN_HU), generator=generator) - 1)
        noise = 5.0 + 20.0 * torch.rand(1, generator=generator).item()
        fixed, moving = (render_ct(generator, labels, hu, noise) for labels in (fixed_labels, moving_labels))
    else:
        palette = random_palette(generator, len(ORGAN_HU))
        fixed, moving = (render(generator, labels, palette) for labels in (fixed_labels, moving_labels))
    axis = int(torch.randint(3, (1,), generator=generator))
    voxel_mm = extent[axis] / grid[axis]
    images = []
    for image in (fixed, moving):
        thickness = 2.0 + 6.0 * torch.rand(1, generator=generator).item()
        if torch.rand(1, generator=generator).item() < 0.5 and thickness > 1.2 * voxel_mm:
            image = slab_average(image, axis, thickness / voxel_mm)
        images.append(image)
    if with_labels:
        return images[0], images[1], fixed_labels, moving_labels
    return images[0], images[1]


def abdomen_validation_pair(abdomen, fixed_index, moving_index, budget_grid, seed=0):
    """A fixed selection pair: two maps, whole field of view, rendered CT-like with a palette drawn
    from ``seed`` (ORGAN_HU +-25, noise 15 HU). Returns ``(fixed, moving, fixed labels, moving
    labels)``: images (1, 1, D, H, W) on the network grid, labels the full-resolution maps
    (1, 1, D', H', W') uint8."""
    generator = torch.Generator().manual_seed(1_000 + seed)
    full = abdomen.maps[fixed_index].shape[2:]
    grid = network_grid([n * d for n, d in zip(full, abdomen.spacings[fixed_index])], budget_grid)
    hu = torch.tensor(ORGAN_HU) + 25.0 * (2 * torch.rand(len(ORGAN_HU), generator=generator) - 1)
    fixed = render_ct(generator, labels_on_grid(abdomen.maps[fixed_index], grid), hu, 15.0)
    moving = render_ct(generator, labels_on_grid(abdomen.maps[moving_index], grid), hu, 15.0)
    return fixed, moving, abdomen.maps[fixed_index], abdomen.maps[moving_index]
