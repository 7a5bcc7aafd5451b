"""Voxel grids and coordinate frames: the one place that converts index, LPS and RAS.

Conventions used across the package:

* Physical points are in millimetres in **LPS** (ITK, SimpleITK, DICOM) unless a name says RAS.
* Arrays taken from SimpleITK are indexed ``[k, j, i]``; vectors and points are ordered
  ``(x, y, z)`` = ``(i, j, k)``.
* ``index_to_lps`` is the 4x4 matrix mapping a homogeneous voxel index ``(i, j, k, 1)`` to an LPS
  point: ``[[D @ diag(S), o], [0, 0, 0, 1]]`` for direction ``D``, spacing ``S`` and origin ``o``.
* Slicer's ``IJKToRAS`` is ``LPS_TO_RAS @ index_to_lps``.
"""
import numpy as np
import SimpleITK as sitk

#: Flips an LPS point or vector to RAS (and back: the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def index_to_lps(image):
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres for a SimpleITK image."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def index_to_ras(image):
    """Slicer's IJKToRAS matrix for a SimpleITK image."""
    return LPS_TO_RAS @ index_to_lps(image)


def flip_lps_ras(points):
    """Points or vectors (..., 3) from LPS to RAS, or from RAS to LPS: the flip negates the first two
    coordinates and is its own inverse."""
    return np.asarray(points, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


def grid_from_ijk_to_ras(ijk_to_ras, size_ijk):
    """An empty SimpleITK image (LPS) on the grid described by Slicer's IJKToRAS matrix.

    Used to bring MRML volumes to the engine without going through files.
    """
    index_to_lps_matrix = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)
    linear = index_to_lps_matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    image = sitk.Image([int(s) for s in size_ijk], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in index_to_lps_matrix[:3, 3]])
    return image


def voxel_centres_lps(image):
    """LPS coordinates of every voxel centre, shaped like the image array: (k, j, i, 3)."""
    size_i, size_j, size_k = image.GetSize()
    matrix = index_to_lps(image)
    # origin + i * column_i + j * column_j + k * column_k, by broadcasting: no index grid.
    along_i = np.arange(size_i)[:, None] * matrix[:3, 0]
    along_j = np.arange(size_j)[:, None, None] * matrix[:3, 1]
    along_k = np.arange(size_k)[:, None, None, None] * matrix[:3, 2]
    return along_k + (along_j + (along_i + matrix[:3, 3]))


def same_geometry(a, b, tolerance_mm=1e-4):
    """True when two images share size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance_mm)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance_mm)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def orientation_of(image):
    """The image's axis layout as a DICOM orientation code ('RAS', 'PSR', ...)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image, orientation):
    """The same voxels with axes permuted/flipped to ``orientation`` (no interpolation): the same
    physical image on a grid of another axis layout."""
    return image if orientation_of(image) == orientation else sitk.DICOMOrient(image, orientation)
