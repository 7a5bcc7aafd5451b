"""Jacobian determinant of a fixed-to-moving mapping given as a displacement field (LPS mm), and of a
network-grid displacement (voxel units) for fold removal."""
import numpy as np
import SimpleITK as sitk

from .fields import dense_field
from .geometry import index_to_lps


def jacobian_determinant(field_lps, reference):
    """det(I + du/dx) at every voxel of ``reference`` (a SimpleITK image giving the grid).

    ``field_lps``: (k, j, i, 3) displacement in mm. Derivatives are central differences in index
    space (one-sided at the borders), turned into physical derivatives with the grid's direction and
    spacing, so oblique and anisotropic grids give the physical Jacobian. An axis of 2 voxels (a
    2-slice stack) gets one-sided differences throughout; an axis of 1 voxel has no derivative
    along it (taken as 0). Never NaN for a finite field. Returns (k, j, i) float64.
    """
    field_lps = np.asarray(field_lps, dtype=np.float64)
    index_per_mm = np.linalg.inv(index_to_lps(reference)[:3, :3])  # d index / d x, rows i, j, k
    # Entry (c, m) of J = I + du/dx is the sum over index axes a of du_c/dindex_a * dindex_a/dx_m,
    # plus 1 on the diagonal. Nine scalar volumes and the 3 x 3 determinant written out: ten times
    # faster than gradients of the (k, j, i, 3) array and a cross product over its last axis.
    entries = []
    for component in range(3):
        by_k, by_j, by_i = _index_gradients(np.ascontiguousarray(field_lps[..., component]))
        entries.append([by_i * index_per_mm[0, m] + by_j * index_per_mm[1, m] + by_k * index_per_mm[2, m]
                        + (1.0 if component == m else 0.0) for m in range(3)])
    return _determinant(entries)


def _determinant(entries):
    """det of a 3 x 3 matrix given as nested lists of volumes (NumPy arrays or tensors)."""
    (a, b, c), (d, e, f), (g, h, i) = entries
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def capped_strides(strides, shape):
    """The strides (D, H, W) that :func:`grid_determinant` differentiates over on a grid of ``shape``
    (D, H, W): each at least 1 and at most its axis' length minus one."""
    return tuple(max(1, min(int(stride), size - 1)) for stride, size in zip(strides, shape))


def grid_determinant(displacement_voxels, differences="central", strides=(1, 1, 1)):
    """det(I + du/dindex) of the map x -> x + u(x) on u's own grid: ``displacement_voxels`` a
    (1, 3, D, H, W) tensor in voxel units of that grid, channels (x, y, z) along (W, H, D), as
    :func:`fmsam.layers.normalised_to_voxels` gives the network's fields. For a grid of any spacing and
    direction A (x_mm = A index), the physical Jacobian is A J A^-1, so this *is* the physical
    determinant. ``differences``:

    - 'central' (one-sided at the borders, as :func:`jacobian_determinant`);
    - 'forward' (u[i+1] - u[i], the last one repeated: the Jacobian of the trilinear map at a cell's
      first corner, which sees the odd-even oscillation central differences are blind to);
    - 'corners': at each voxel the least of the 8 Jacobians of the trilinear map at that voxel, one
      per cell it is a corner of (forward or backward difference along each axis): every corner of
      every cell is checked, where 'forward' sees one of each cell's eight. The determinant is linear
      in each column and a central difference is the mean of the two one-sided ones, so the central
      det J is the mean of these 8 and never below their least. (Inside a cell the trilinear map can
      still fold where all 8 corners are positive: rare, and not seen here.)

    ``strides`` (D, H, W), for 'forward' and 'corners': one-sided differences over that many voxels
    along each axis, divided by it (secants), as a coarser grid sampling the same map differentiates
    (a thick-slice image's determinant across its slices, :func:`fmsam.inference.remove_folds`);
    a stride is capped at the axis' length minus one.

    No derivative along an axis of a single voxel. Returns a (D, H, W) tensor; on 80 x 100 x 100 with
    one thread about 25 ms for 'central' and 'forward' (0.2 s for the NumPy version), 90 ms for
    'corners'."""
    import torch

    if differences not in ("central", "forward", "corners"):
        raise ValueError("differences must be 'central', 'forward' or 'corners', not %r" % (differences,))
    if differences == "central" and tuple(strides) != (1, 1, 1):
        raise ValueError("strides apply to one-sided differences ('forward', 'corners'), not 'central'")
    field = displacement_voxels[0]
    strides = capped_strides(strides, field.shape[1:])
    dims = {0: 2, 1: 1, 2: 0}  # channel x differentiates along W (dim 2 of a (D, H, W) volume), ...

    def one_sided(volume, dim):
        """(forward, backward) differences along ``dim`` over its stride, the missing ones at a
        border replaced by the nearest other; zeros along an axis of one voxel."""
        size = volume.shape[dim]
        if size < 2:
            return torch.zeros_like(volume), torch.zeros_like(volume)
        stride = strides[dim]
        step = (volume.narrow(dim, stride, size - stride) - volume.narrow(dim, 0, size - stride)) / stride
        last = step.narrow(dim, step.shape[dim] - 1, 1).expand_as(volume.narrow(dim, 0, stride))
        first = step.narrow(dim, 0, 1).expand_as(volume.narrow(dim, 0, stride))
        return torch.cat([step, last], dim=dim), torch.cat([first, step], dim=dim)

    def determinant(derivative):
        """det J from ``derivative(component, along)`` (a (D, H, W) volume)."""
        return _determinant([[derivative(component, along) + (1.0 if component == along else 0.0)
                              for along in range(3)] for component in range(3)])

    if differences == "central":
        def central(component, along):
            dim = dims[along]
            return (torch.gradient(field[component], dim=dim)[0] if field.shape[1 + dim] > 1
                    else torch.zeros_like(field[component]))
        return determinant(central)
    sides = [[one_sided(field[component], dims[along]) for along in range(3)] for component in range(3)]
    if differences == "forward":
        return determinant(lambda component, along: sides[component][along][0])
    least = None
    for corner in range(8):  # bit a of corner: backward differences along axis a
        found = determinant(lambda component, along: sides[component][along][(corner >> along) & 1])
        least = found if least is None else torch.minimum(least, found)
    return least


def transform_jacobian(transform, reference, slab=24):
    """det J of ``transform`` (any SimpleITK transform, fixed -> moving) at every voxel of
    ``reference``: (k, j, i) float64, equal to :func:`jacobian_determinant` of the transform's dense
    field on that grid, computed a slab of ``slab`` k-planes at a time (with one plane of overlap
    each side, so the central differences are those of the whole grid): the dense field is never
    held whole (a 256^3 grid's would take 400 MB, its nine derivative volumes 1.2 GB)."""
    size_i, size_j, size_k = reference.GetSize()
    determinant = np.empty((size_k, size_j, size_i), dtype=np.float64)
    to_lps = index_to_lps(reference)
    for start in range(0, size_k, slab):
        stop = min(size_k, start + slab)
        first, last = max(0, start - 1), min(size_k, stop + 1)
        part = sitk.Image([size_i, size_j, last - first], sitk.sitkUInt8)
        part.SetSpacing(reference.GetSpacing())
        part.SetDirection(reference.GetDirection())
        part.SetOrigin([float(value) for value in to_lps[:3, :3] @ [0.0, 0.0, float(first)] + to_lps[:3, 3]])
        values = jacobian_determinant(dense_field(transform, part), part)
        determinant[start:stop] = values[start - first:start - first + stop - start]
    return determinant


def _index_gradients(volume):
    """Derivatives of a (k, j, i) volume along k, j and i in index units (``np.gradient``: central
    inside, one-sided at the borders), zero along an axis of a single voxel."""
    axes = [axis for axis in range(3) if volume.shape[axis] > 1]
    found = np.gradient(volume, axis=axes) if axes else []
    if len(axes) == 1:
        found = [found]
    gradients = [np.zeros_like(volume) for _ in range(3)]
    for axis, gradient in zip(axes, found):
        gradients[axis] = gradient
    return gradients


def jacobian_statistics(determinant, mask=None):
    """Folding percent (det <= 0), min, max, mean and standard deviation of log|J|."""
    values = np.asarray(determinant, dtype=np.float64)
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    values = values.ravel()
    log_abs = np.log(np.clip(np.abs(values), 1e-9, None))
    return {
        "folding_percent": float(100.0 * np.mean(values <= 0)),
        "folding_voxels": int(np.sum(values <= 0)),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "jacobian_mean": float(values.mean()),
        "log_jacobian_std": float(log_abs.std()),
    }
