"""Reading and checking images, label maps and transforms.

Everything is read with SimpleITK, so images keep their physical geometry (origin, spacing,
direction cosines in LPS). Inputs are never modified: the functions here return new images.
"""
import os

import numpy as np
import SimpleITK as sitk

from .errors import InputError, error_line
from .geometry import same_geometry
from .nifti import nifti_nonfinite_voxels

_READABLE_HINT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"

#: Smallest volume registered: at least 2 voxels along every axis, MIN_PLANE_VOXELS along the two
#: longest axes and MIN_VOXELS in all. The affine stage's coarsest level shrinks the image 4 times
#: (a 12x12x12 cube fails there, 16x16x16 registers); thin stacks such as 480x480x3 pass.
MIN_AXIS_VOXELS, MIN_PLANE_VOXELS, MIN_VOXELS = 2, 16, 4096
#: Largest label value: label maps are handled as UInt32 images.
MAX_LABEL = 2 ** 32 - 1
#: How far a direction matrix may be from orthonormal (D^T D = I): float32 headers round to 1e-7.
DIRECTION_TOLERANCE = 1e-3
#: Largest voxel spacing accepted, in mm (10 m): anything larger is a broken header.
MAX_SPACING_MM = 1e4


def read_image(path_or_image, what="image"):
    """Return a SimpleITK image from a path or an image. A file's header is read first, and broken
    geometry (:func:`check_geometry`: a spacing that is not positive, a non-finite origin, a direction
    matrix that is not a rotation) is refused with a message naming the file; the voxels are not
    checked here (see :func:`load_scalar_volume`)."""
    if isinstance(path_or_image, sitk.Image):
        return path_or_image
    path = os.fspath(path_or_image)
    if not os.path.isfile(path):
        raise InputError("%s file not found: %s" % (what, path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        check_geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                       "%s %s" % (what, path))
        return reader.Execute()
    except RuntimeError as error:
        raise InputError("cannot read %s %s (expected %s): %s"
                         % (what, path, _READABLE_HINT, error_line(error))) from None


def check_geometry(spacing, origin, direction, name):
    """Raise :class:`InputError` unless the spacing (mm) is positive, finite and at most
    :data:`MAX_SPACING_MM`, the origin (LPS mm) finite and the direction a rotation."""
    spacing, origin = np.asarray(spacing, dtype=np.float64), np.asarray(origin, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0) and np.all(spacing <= MAX_SPACING_MM)):
        raise InputError("%s has voxel spacing %s mm; each spacing must be positive and at most %g mm"
                         % (name, "x".join("%g" % v for v in spacing), MAX_SPACING_MM))
    if not np.all(np.isfinite(origin)):
        raise InputError("%s has origin %s; it must be finite (mm)"
                         % (name, "x".join("%g" % v for v in origin)))
    check_direction(direction, name)


def check_direction(direction, name):
    """Raise :class:`InputError` unless ``direction`` (row-major n x n cosines, as SimpleITK gives
    them) is orthonormal: its columns unit vectors at right angles (a rotation or reflection)."""
    size = int(round(len(direction) ** 0.5))
    matrix = np.array(direction, dtype=np.float64).reshape(size, size)
    if np.allclose(matrix.T @ matrix, np.eye(size), atol=DIRECTION_TOLERANCE):
        return
    rows = " / ".join(" ".join("%g" % v for v in row) for row in matrix)
    kind = "singular" if abs(np.linalg.det(matrix)) < 1e-6 else "not orthonormal"
    raise InputError("%s has a direction matrix that is %s (%s); its columns must be unit vectors at "
                     "right angles (a rotation), as in every scanner image" % (name, kind, rows))


def check_size(image, name):
    """Raise :class:`InputError` for a volume too small to register (see :data:`MIN_VOXELS`)."""
    size = image.GetSize()
    ordered = sorted(size)
    voxels = int(np.prod(size))
    if ordered[0] < MIN_AXIS_VOXELS or ordered[-2] < MIN_PLANE_VOXELS or voxels < MIN_VOXELS:
        raise InputError("%s has %s voxels (%d in all); registration needs at least %d along every "
                         "axis, %d along the two longest and %d in all (thin stacks such as 480x480x3 "
                         "are fine)" % (name, "x".join(map(str, size)), voxels, MIN_AXIS_VOXELS,
                                        MIN_PLANE_VOXELS, MIN_VOXELS))


def _check_raw_values(path_or_image, name):
    """NIfTI readers turn NaN and infinite voxels into 0: look at the file's own data."""
    if isinstance(path_or_image, sitk.Image):
        return
    bad = nifti_nonfinite_voxels(os.fspath(path_or_image))
    if bad:
        raise InputError("%s contains NaN or infinite values (%d voxels in the file's data)" % (name, bad))


def describe(what, path_or_image):
    """``"moving image /path/file.nii.gz"`` (or ``"... (given image)"``) for messages."""
    if isinstance(path_or_image, sitk.Image):
        return "%s (given image)" % what
    return "%s %s" % (what, os.fspath(path_or_image))


def load_scalar_volume(path_or_image, what="image"):
    """Read a 3D scalar volume and check that it can be registered.

    Returns the image unchanged (pixel type and geometry as read). Raises :class:`InputError` for
    2D or 4D images, vector images, broken geometry (:func:`check_geometry`), volumes under the
    minimum size (:func:`check_size`), non-finite values (also where a NIfTI reader turned them
    into 0), and empty or constant images.
    """
    image = read_image(path_or_image, what)
    name = describe(what, path_or_image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("%s is a vector image with %d components; a scalar volume is needed"
                         % (name, image.GetNumberOfComponentsPerPixel()))
    if image.GetDimension() != 3:
        raise InputError("%s is %dD; a 3D volume is needed" % (name, image.GetDimension()))
    check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), name)
    check_size(image, name)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.all(np.isfinite(voxels)):
        raise InputError("%s contains NaN or infinite values" % name)
    _check_raw_values(path_or_image, name)
    if voxels.min() == voxels.max():
        raise InputError("%s is empty or constant (every voxel is %g)" % (name, float(voxels.min())))
    return image


def load_label_map(path_or_image, what="label map"):
    """Read a 3D integer label map (0 = background, labels 1 to 2^32 - 1) as a UInt32 image."""
    image = read_image(path_or_image, what)
    name = describe(what, path_or_image)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError("%s must be a 3D scalar label map" % name)
    check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), name)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f":
        _check_raw_values(path_or_image, name)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError("%s has non-integer values; a label map holds integer labels" % name)
    if values.min() < 0:
        raise InputError("%s has negative labels (lowest %g); labels are 0 (background) to %d"
                         % (name, values.min(), MAX_LABEL))
    if values.max() > MAX_LABEL:
        raise InputError("%s has label %d; labels from 0 to %d are supported"
                         % (name, values.max(), MAX_LABEL))
    return sitk.Cast(image, sitk.sitkUInt32)


def describe_grid_difference(image, labels, tolerance_mm=1e-3):
    """``"spacing 1x1x1 vs 2x2x2; origin ..."``: what differs between two grids (size, spacing,
    origin in LPS mm, direction), with the image's value first; '' when they match."""
    def show(values):
        return "x".join("%g" % v for v in values)

    differences = []
    for what, get, tolerance in (("size", "GetSize", 0), ("spacing", "GetSpacing", tolerance_mm),
                                 ("origin", "GetOrigin", tolerance_mm), ("direction", "GetDirection", 1e-6)):
        mine, theirs = getattr(image, get)(), getattr(labels, get)()
        if len(mine) != len(theirs) or not np.allclose(mine, theirs, atol=tolerance, rtol=0):
            differences.append("%s %s vs %s" % (what, show(theirs), show(mine)))
    return "; ".join(differences)


def check_same_grid(image, labels, labels_name, image_name):
    """Raise unless ``labels`` lies on ``image``'s voxel grid (size, spacing, origin, direction);
    the message names both and gives each differing value, the label map's first."""
    if not same_geometry(image, labels, tolerance_mm=1e-3):
        raise InputError("%s is not on the grid of %s: %s (label map vs image; size, spacing, origin "
                         "and direction must match)"
                         % (labels_name, image_name, describe_grid_difference(image, labels)))


def load_label_map_on_grid(labels, image, image_source, role):
    """Read ``labels`` (the ``role``, 'fixed' or 'moving', image's label map) and check that it lies
    on ``image``'s grid (``image_source``: the path or image it came from, for messages)."""
    label_map = load_label_map(labels, role + " label map")
    check_same_grid(image, label_map, describe(role + " label map", labels),
                    describe("the %s image" % role, image_source))
    return label_map


def read_registration_transform(path):
    """Read an ITK transform file (LPS, fixed point -> moving point): ``fmsam register``'s composite
    ``transform.h5`` (affine + displacement field), a plain displacement field, an affine or any
    other transform ITK reads. Returns ``(transform, grid of its last displacement field or None)``.
    Every displacement must be finite."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("transform file not found: %s" % path)
    try:
        transform = sitk.ReadTransform(path)
    except RuntimeError:
        raise InputError("cannot read transform %s (expected an ITK transform file, .h5 or .tfm)"
                         % path) from None
    parts = [transform]
    if isinstance(transform, sitk.CompositeTransform):
        parts = [transform.GetNthTransform(n) for n in range(transform.GetNumberOfTransforms())]
        if len(parts) == 1:
            transform = parts[0]
    grid = None
    for part in parts:
        if part.GetTransformEnum() == sitk.sitkDisplacementField:
            field = sitk.DisplacementFieldTransform(part).GetDisplacementField()
            displacements = sitk.GetArrayViewFromImage(field)
            finite = np.isfinite(displacements)
            if not finite.all():
                raise InputError("transform %s holds non-finite displacements (%d of %d values NaN or "
                                 "infinite)" % (path, finite.size - int(finite.sum()), finite.size))
            grid = sitk.Image(field.GetSize(), sitk.sitkUInt8)
            grid.CopyInformation(field)
    return transform, grid


def write_atomically(write, path):
    """Call ``write(tmp_path)`` and move the result to ``path`` only when it succeeded. The
    temporary file is hidden and named after this process (see :mod:`fmsam.outputs`), so that a
    later run removes it if this one is killed."""
    from .outputs import partial_prefix, remove_dead_partials

    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    remove_dead_partials(directory)
    # Keep the real extension last so that SimpleITK and matplotlib pick the right writer.
    temporary = os.path.join(directory, partial_prefix() + name)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
