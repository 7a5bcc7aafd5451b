"""The registration's mapping: an affine and a displacement field on the network grid, both in LPS mm.

The mapping from a fixed point ``x`` to its moving point is ``affine(x + d(x))``: a deformable step
in the fixed frame, then the affine pre-alignment. ``d`` is a :class:`Deformation`: its values at
the voxel centres of the grid the network computed it on (which spans the fixed image, first to
last voxel centre), interpolated linearly in between, as ITK's ``DisplacementFieldTransform``
does. Its size does not depend on the fixed image's resolution. The inverse mapping (moving point
to fixed point) is ``y -> z + e(z)`` with ``z = affine^-1(y)`` and ``e`` the inverse deformation on
the same grid.

A *dense field* is a numpy array ``(k, j, i, 3)`` of float64 on a chosen grid (the fixed image's):
at voxel centre ``x`` it holds ``fixed_to_moving(x) - x``, the resampling map ITK's
``DisplacementFieldTransform`` expects and that Slicer loads as a grid transform's "from parent"
transform.
"""
import dataclasses

import numpy as np
import SimpleITK as sitk

from .geometry import index_to_lps, voxel_centres_lps


@dataclasses.dataclass
class Deformation:
    """A displacement field on its own grid: ``x -> x + displacement(x)``, in the fixed frame.

    ``grid``: a SimpleITK image whose geometry (size, spacing, origin, direction; LPS) is the grid's;
    its voxels are not used. ``displacement``: (k, j, i, 3) float32 LPS millimetres on that grid,
    vector order (x, y, z). Linear interpolation between voxel centres, zero displacement beyond
    half a voxel outside the grid (ITK's convention)."""

    grid: sitk.Image
    displacement: np.ndarray

    def image(self):
        """The displacements as a SimpleITK vector image (float64, ITK's transform type) on the grid."""
        return field_image(self.displacement, self.grid)

    def transform(self):
        """A new ``sitk.DisplacementFieldTransform`` of the deformation (it owns its own copy)."""
        return sitk.DisplacementFieldTransform(self.image())


def network_grid(fixed, shape_kji):
    """An image with the geometry of the network grid over ``fixed``: ``shape_kji`` voxels whose
    first and last centres coincide with ``fixed``'s (``align_corners=True``, see
    :mod:`fmsam.layers`), same direction and origin; spacing stretched accordingly."""
    size_ijk = np.array(fixed.GetSize(), dtype=np.float64)
    shape_ijk = np.array(shape_kji[::-1], dtype=np.float64)
    spacing = np.array(fixed.GetSpacing()) * np.where(shape_ijk > 1, (size_ijk - 1) / np.maximum(shape_ijk - 1, 1), 1.0)
    grid = sitk.Image([int(n) for n in shape_ijk], sitk.sitkUInt8)
    grid.SetOrigin(fixed.GetOrigin())
    grid.SetDirection(fixed.GetDirection())
    grid.SetSpacing([float(max(value, 1e-6)) for value in spacing])
    return grid


def cover_fixed_voxels(deformation, fixed):
    """``deformation`` with its grid extended by copies of its edge values (as many network voxels per
    side as it takes to reach half a ``fixed`` voxel beyond the first and last voxel centres, plus
    one), so that ITK, which sets the displacement to zero beyond half a grid voxel, and Slicer,
    which repeats the edge value, agree over the whole of the fixed image's voxels (its buffer),
    not only between its first and last voxel centres: on a stack of 8 mm slices the outer half
    slices would otherwise get the affine alone. Values at the original grid's points (and so at
    every fixed voxel centre) are unchanged."""
    grid = deformation.grid
    network_spacing = np.array(grid.GetSpacing())
    pad = [int(np.ceil(0.5 * f / n)) + 1 for f, n in zip(fixed.GetSpacing(), network_spacing)]  # i, j, k
    displacement = np.pad(deformation.displacement, [(p, p) for p in pad[::-1]] + [(0, 0)], mode="edge")
    padded = sitk.Image([n + 2 * p for n, p in zip(grid.GetSize(), pad)], sitk.sitkUInt8)
    padded.SetSpacing(grid.GetSpacing())
    padded.SetDirection(grid.GetDirection())
    padded.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-float(p) for p in pad]))
    return Deformation(padded, displacement)


def normalised_to_lps(displacement, fixed):
    """A normalised network displacement (1, 3, D, H, W) tensor over ``fixed`` (any resolution of
    the same extent) as (D, H, W, 3) float32 LPS millimetres: one normalised unit along an axis is
    half the distance between ``fixed``'s first and last voxel centres along it."""
    size_ijk = np.array(fixed.GetSize(), dtype=np.float64)
    half_extent_mm = (size_ijk - 1) / 2.0 * np.array(fixed.GetSpacing())
    to_lps = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(half_extent_mm)
    values = displacement.detach().double().cpu()[0].permute(1, 2, 3, 0).numpy()
    return (values @ to_lps.T).astype(np.float32)


def registration_transform(affine, deformation):
    """The fixed-to-moving mapping ``x -> affine(x + d(x))`` as one ``sitk.CompositeTransform``
    (ITK applies the last transform added first)."""
    return sitk.CompositeTransform([as_affine_transform(affine), deformation.transform()])


def inverse_registration_transform(affine, inverse_deformation):
    """The moving-to-fixed mapping ``y -> z + e(z)``, ``z = affine^-1(y)``, as one
    ``sitk.CompositeTransform``."""
    return sitk.CompositeTransform([inverse_deformation.transform(), as_affine_transform(affine).GetInverse()])


def dense_field(transform, reference):
    """``transform(x) - x`` at every voxel centre of ``reference``: (k, j, i, 3) float64 LPS mm."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    return sitk.GetArrayFromImage(field)


def affine_matrix(affine):
    """A linear SimpleITK transform (affine, Euler, versor, translation, scale, identity; None: the
    identity) as a 4x4 homogeneous matrix acting on LPS points, read off the images of the origin
    and the three unit points (so any linear transform type works)."""
    matrix = np.eye(4)
    if affine is None or affine.GetTransformEnum() == sitk.sitkIdentity:
        return matrix
    origin = np.array(affine.TransformPoint((0.0, 0.0, 0.0)))
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.array(affine.TransformPoint(unit)) - origin
    matrix[:3, 3] = origin
    return matrix


def as_affine_transform(affine):
    """Any linear SimpleITK transform (see :func:`affine_matrix`) as an ``sitk.AffineTransform``."""
    matrix = affine_matrix(affine)
    return sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())


def affine_apply(affine, points_lps):
    """Apply a linear SimpleITK transform (see :func:`affine_matrix`) to points (..., 3) at once."""
    matrix = affine_matrix(affine)
    return np.asarray(points_lps, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def compose_fixed_to_moving(fixed, affine, deformable_index=None):
    """One field for ``x -> affine(x + deformable(x))``: the deformable step in fixed voxel-index
    units (k, j, i, 3) runs first, in the fixed frame, then the affine pre-alignment takes the point
    to the moving image. Returns the LPS displacement field (k, j, i, 3)."""
    centres = voxel_centres_lps(fixed)
    points = centres
    if deformable_index is not None:
        points = centres + deformable_index @ index_to_lps(fixed)[:3, :3].T
    return affine_apply(affine, points) - centres


def image_on_grid(voxels_kji, reference):
    """A scalar SimpleITK image of ``voxels_kji`` (its own copy) on ``reference``'s grid."""
    image = sitk.GetImageFromArray(voxels_kji)
    image.CopyInformation(reference)
    return image


def field_image(field_lps, reference, pixel_type=sitk.sitkVectorFloat64):
    """The field as a SimpleITK vector image on ``reference``'s grid (float64, ITK's transform
    type, unless ``pixel_type`` is ``sitk.sitkVectorFloat32``)."""
    dtype = np.float32 if pixel_type == sitk.sitkVectorFloat32 else np.float64
    image = sitk.GetImageFromArray(np.ascontiguousarray(field_lps, dtype=dtype), isVector=True)
    image.CopyInformation(reference)
    return image


def field_transform(field_lps, reference):
    """A ``sitk.DisplacementFieldTransform`` (linear interpolation, zero outside the grid)."""
    # The transform takes ownership of the image it is given, so it gets its own copy.
    return sitk.DisplacementFieldTransform(field_image(field_lps, reference))


def resample(image, reference, transform, nearest=False, default_value=0.0):
    """The one resampler for outputs: ``image`` seen through ``transform`` on ``reference``'s grid,
    keeping ``image``'s pixel type (linear, or nearest neighbour for label maps)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, default_value, image.GetPixelID())
