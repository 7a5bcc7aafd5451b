"""Jacobian determinant of a fixed-to-moving mapping given as a displacement field (LPS mm)."""
import numpy as np

from .geometry import index_to_lps


def jacobian_determinant(field_lps, reference):
    """det(I + du/dx) at every voxel of ``reference`` (a SimpleITK image giving the grid).

    ``field_lps``: (k, j, i, 3) displacement in mm. Derivatives are central differences in index
    space (one-sided at the borders), turned into physical derivatives with the grid's direction and
    spacing, so oblique and anisotropic grids give the physical Jacobian. Returns (k, j, i) float64.
    """
    field_lps = np.asarray(field_lps, dtype=np.float64)
    # d u / d(i, j, k): np.gradient over array axes (k, j, i).
    by_k, by_j, by_i = np.gradient(field_lps, axis=(0, 1, 2))
    index_per_mm = np.linalg.inv(index_to_lps(reference)[:3, :3])  # d index / d x, rows i, j, k
    # Column m of J = I + du/dx: sum over index axes a of du/dindex_a * dindex_a/dx_m, plus e_m.
    # Built column by column (no (..., 3, 3) stack: this is the slow part for millions of voxels),
    # and det J = col0 . (col1 x col2).
    columns = []
    for m in range(3):
        column = by_i * index_per_mm[0, m] + by_j * index_per_mm[1, m] + by_k * index_per_mm[2, m]
        column[..., m] += 1.0
        columns.append(column)
    return np.einsum("...c,...c->...", columns[0], np.cross(columns[1], columns[2]))


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
