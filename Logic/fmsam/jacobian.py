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
    # d u / d(i, j, k): np.gradient over array axes (k, j, i) -> reorder to (i, j, k).
    by_k, by_j, by_i = np.gradient(field_lps, axis=(0, 1, 2))
    du_dindex = np.stack([by_i, by_j, by_k], axis=-1)            # (..., component, index axis)
    index_per_mm = np.linalg.inv(index_to_lps(reference)[:3, :3])  # d index / d x
    jacobian = du_dindex @ index_per_mm + np.eye(3)
    return np.linalg.det(jacobian)


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
