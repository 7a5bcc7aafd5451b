"""The Jacobian determinant of analytic fields, on oblique anisotropic grids."""
import numpy as np
import pytest

from fmsam.geometry import voxel_centres_lps
from fmsam.jacobian import jacobian_determinant, jacobian_statistics
from test_geometry import oblique_anisotropic_image


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.3])
def test_pure_scaling_gives_its_constant_determinant(scale):
    image = oblique_anisotropic_image()
    centres = voxel_centres_lps(image)
    field = (scale - 1.0) * (centres - np.array([4.0, -2.0, 9.0]))
    determinant = jacobian_determinant(field, image)
    np.testing.assert_allclose(determinant, scale ** 3, rtol=1e-9)


def test_general_linear_map_gives_det_of_its_matrix():
    image = oblique_anisotropic_image()
    matrix = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.2]])
    centres = voxel_centres_lps(image)
    field = centres @ (matrix - np.eye(3)).T
    np.testing.assert_allclose(jacobian_determinant(field, image), np.linalg.det(matrix), rtol=1e-9)


def test_folding_is_counted():
    image = oblique_anisotropic_image()
    centres = voxel_centres_lps(image)
    # A reflection (x -> -x) everywhere: det = -1, every voxel folds.
    field = np.zeros_like(centres)
    field[..., 0] = -2.0 * centres[..., 0]
    stats = jacobian_statistics(jacobian_determinant(field, image))
    assert stats["folding_percent"] == pytest.approx(100.0)
    assert stats["jacobian_min"] == pytest.approx(-1.0)
    stats = jacobian_statistics(np.array([2.0, 0.5, -0.1, 1.0]))
    assert stats["folding_percent"] == pytest.approx(25.0)
    assert stats["folding_voxels"] == 1
