"""Reading and checking images, label maps and transforms.

Everything is read with SimpleITK, so images keep their physical geometry (origin, spacing,
direction cosines in LPS). Inputs are never modified: the functions here return new images.
"""
import os

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import same_geometry

_READABLE_HINT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"


def read_image(path_or_image, what="image"):
    """Return a SimpleITK image from a path or an image, without checking its content."""
    if isinstance(path_or_image, sitk.Image):
        return path_or_image
    path = os.fspath(path_or_image)
    if not os.path.isfile(path):
        raise InputError("%s file not found: %s" % (what, path))
    try:
        return sitk.ReadImage(path)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError("cannot read %s %s (expected %s): %s"
                         % (what, path, _READABLE_HINT, first_line)) from None


def _describe(path_or_image):
    if isinstance(path_or_image, sitk.Image):
        return "given image"
    return os.fspath(path_or_image)


def load_scalar_volume(path_or_image, what="image"):
    """Read a 3D scalar volume and check that it can be registered.

    Returns the image unchanged (pixel type and geometry as read). Raises :class:`InputError` for
    2D or 4D images, vector images, non-finite values, and empty or constant images.
    """
    image = read_image(path_or_image, what)
    name = "%s %s" % (what, _describe(path_or_image))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("%s is a vector image with %d components; a scalar volume is needed"
                         % (name, image.GetNumberOfComponentsPerPixel()))
    if image.GetDimension() != 3:
        raise InputError("%s is %dD; a 3D volume is needed" % (name, image.GetDimension()))
    if min(image.GetSize()) < 2:
        raise InputError("%s has size %s; every axis needs at least 2 voxels (a 3D volume is needed)"
                         % (name, "x".join(map(str, image.GetSize()))))
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.all(np.isfinite(voxels)):
        raise InputError("%s contains NaN or infinite values" % name)
    if voxels.min() == voxels.max():
        raise InputError("%s is empty or constant (every voxel is %g)" % (name, float(voxels.min())))
    return image


def load_label_map(path_or_image, what="label map"):
    """Read a 3D integer label map (0 = background) as a UInt32 image."""
    image = read_image(path_or_image, what)
    name = "%s %s" % (what, _describe(path_or_image))
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError("%s must be a 3D scalar label map" % name)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError("%s has non-integer values; a label map holds integer labels" % name)
    if values.min() < 0:
        raise InputError("%s has negative labels" % name)
    return sitk.Cast(image, sitk.sitkUInt32)


def check_same_grid(image, labels, what):
    """Raise unless ``labels`` lies on ``image``'s voxel grid (size, spacing, origin, direction)."""
    same = same_geometry(image, labels, tolerance_mm=1e-3)
    if not same:
        raise InputError("%s is not on the grid of its image (size, spacing, origin and direction "
                         "must match)" % what)


def read_displacement_transform(path):
    """Read an ITK displacement-field transform file (LPS, fixed point -> moving point)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("transform file not found: %s" % path)
    try:
        transform = sitk.ReadTransform(path)
    except RuntimeError:
        raise InputError("cannot read transform %s (expected an ITK transform file, .h5 or .tfm)"
                         % path) from None
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    if transform.GetTransformEnum() != sitk.sitkDisplacementField:
        raise InputError("transform %s is not a displacement field (it is %s)"
                         % (path, transform.GetName()))
    return sitk.DisplacementFieldTransform(transform)


def write_atomically(write, path):
    """Call ``write(tmp_path)`` and move the result to ``path`` only when it succeeded."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    # Keep the real extension last so that SimpleITK and matplotlib pick the right writer.
    temporary = os.path.join(directory, ".partial-" + name)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
