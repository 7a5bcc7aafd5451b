"""Dense displacement fields on the fixed image grid, in LPS millimetres, and ITK transform files.

A field is a numpy array ``(k, j, i, 3)`` of float64: at fixed voxel centre ``x`` (LPS) it holds
``fixed_to_moving(x) - x``, the resampling map ITK's ``DisplacementFieldTransform`` expects and
that Slicer loads as a grid transform's "from parent" transform.
"""
import numpy as np
import SimpleITK as sitk

from .geometry import index_to_lps, voxel_centres_lps


def network_to_fixed_index_displacement(displacement, fixed_size_ijk):
    """Bring a normalised network displacement (1, 3, D, H, W) tensor to the fixed image's full
    grid, in fixed voxel-index units: numpy ``(k, j, i, 3)``, vector order (i, j, k)."""
    from .layers import resize  # torch is only needed when a network ran

    size_i, size_j, size_k = fixed_size_ijk
    full = resize(displacement.detach().float().cpu(), (size_k, size_j, size_i))[0]
    half_extent = np.array([(size_i - 1) / 2.0, (size_j - 1) / 2.0, (size_k - 1) / 2.0])
    return full.permute(1, 2, 3, 0).double().numpy() * half_extent


def affine_apply(affine, points_lps):
    """Apply a SimpleITK affine (or Euler/versor/identity) transform to points (..., 3) at once."""
    affine = sitk.AffineTransform(3) if affine is None else affine
    if affine.GetTransformEnum() == sitk.sitkIdentity:
        return np.asarray(points_lps, dtype=np.float64)
    as_affine = sitk.AffineTransform(affine)
    matrix = np.array(as_affine.GetMatrix()).reshape(3, 3)
    centre = np.array(as_affine.GetCenter())
    translation = np.array(as_affine.GetTranslation())
    return (np.asarray(points_lps) - centre) @ matrix.T + centre + translation


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


def field_image(field_lps, reference):
    """The field as a SimpleITK vector image (float64) on ``reference``'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(field_lps, dtype=np.float64), isVector=True)
    image.CopyInformation(reference)
    return image


def field_transform(field_lps, reference):
    """A ``sitk.DisplacementFieldTransform`` (linear interpolation, zero outside the grid)."""
    # The transform takes ownership of the image it is given, so it gets its own copy.
    return sitk.DisplacementFieldTransform(field_image(field_lps, reference))


def field_from_transform(transform):
    """Array (k, j, i, 3) and reference grid of a displacement-field transform."""
    displacement = transform.GetDisplacementField()
    reference = sitk.Image(displacement.GetSize(), sitk.sitkFloat32)
    reference.CopyInformation(displacement)
    return sitk.GetArrayFromImage(displacement).astype(np.float64), reference


def resample(image, reference, transform, nearest=False, default_value=0.0):
    """The one resampler for outputs: ``image`` seen through ``transform`` on ``reference``'s grid,
    keeping ``image``'s pixel type (linear, or nearest neighbour for label maps)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, default_value, image.GetPixelID())
