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


def test_network_grid_determinant_equals_the_physical_one():
    """grid_determinant of a field in voxel units (channels x, y, z along W, H, D) equals
    jacobian_determinant of the same map written in LPS mm on an oblique, anisotropic grid: index-
    space and physical determinants agree (J_mm = A J_index A^-1)."""
    import torch

    from fmsam.geometry import index_to_lps
    from fmsam.jacobian import grid_determinant

    reference = oblique_anisotropic_image()
    size_i, size_j, size_k = reference.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (size_k, size_j, size_i)], indexing="ij")
    voxels = 3.0 * np.stack([0.8 * np.sin(0.4 * j + 0.2 * k), 0.6 * np.cos(0.3 * i), 0.9 * np.sin(0.25 * i + 0.3 * j)], axis=-1)
    matrix = index_to_lps(reference)[:3, :3]
    field_lps = voxels @ matrix.T  # a displacement of (di, dj, dk) voxels is A (di, dj, dk) mm
    expected = jacobian_determinant(field_lps, reference)
    found = grid_determinant(torch.from_numpy(voxels).permute(3, 0, 1, 2)[None]).numpy()
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, atol=1e-9)
    assert expected.min() < 0.0 < 1.5 < expected.max()  # a field with real variation, folding in places
    # A single-voxel axis has no derivative along it, as in jacobian_determinant.
    flat = torch.zeros(1, 3, 1, 6, 7)
    flat[:, 0] = 0.5 * torch.arange(7.0)  # x stretched by 1.5
    assert torch.allclose(grid_determinant(flat), torch.full((1, 6, 7), 1.5, dtype=flat.dtype))


def test_remove_folds_smooths_only_around_the_fold():
    """A field folded in one spot (a sharp bump along x) comes back with det
    J >= UNFOLD_MIN_DETERMINANT everywhere, changed only near the bump; a fold-free field comes back
    unchanged, in 0 rounds."""
    import torch

    from fmsam.inference import UNFOLD_MIN_DETERMINANT, remove_folds
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import normalised_to_voxels, voxels_to_normalised

    shape = (24, 28, 32)
    d, h, w = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    bump = torch.exp(-((d - 12) ** 2 + (h - 14) ** 2 + (w - 10) ** 2) / (2 * 1.5 ** 2))
    voxels = torch.zeros(1, 3, *shape)
    voxels[0, 0] = 4.0 * bump  # x moves by up to 4 voxels over about 2: the map folds (det J down to -0.33)
    voxels[0, 1] = 0.3 * torch.sin(0.2 * w)  # smooth elsewhere, fold-free
    field = voxels_to_normalised(voxels)
    before = grid_determinant(voxels)
    assert float(before.min()) < -0.3
    repaired, report = remove_folds(field)
    after = grid_determinant(normalised_to_voxels(repaired))
    after_corners = grid_determinant(normalised_to_voxels(repaired), "corners")
    print(report, float(before.min()), float(after.min()), float(after_corners.min()))
    assert float(after.min()) >= UNFOLD_MIN_DETERMINANT and float(after_corners.min()) >= UNFOLD_MIN_DETERMINANT
    # folded voxels: central differences 6, with the forward corner 12, with all 8 corners 15
    folded = (before <= 0) | (grid_determinant(voxels, "corners") <= 0)
    by_forward = int(((before <= 0) | (grid_determinant(voxels, "forward") <= 0)).sum())
    assert report["unfold_voxels"] == int(folded.sum()) > by_forward > int((before <= 0).sum())
    assert 1 <= report["unfold_rounds"] < 20 and report["unfold_left_voxels"] == 0
    change = normalised_to_voxels(repaired - field).abs().amax(dim=1)[0]
    assert report["unfold_max_change_voxels"] == pytest.approx(float(change.max()), abs=1e-4)
    far = (d - 12) ** 2 + (h - 14) ** 2 + (w - 10) ** 2 > 15 ** 2
    assert float(change[far].max()) < 1e-3  # the rest of the field is left as it was
    smooth = voxels_to_normalised((0.3 * torch.sin(0.2 * w)).expand(1, 3, *shape).clone())
    same, report = remove_folds(smooth)
    assert torch.equal(same, smooth) and report["unfold_rounds"] == 0 and report["unfold_voxels"] == 0


def test_forward_differences_see_the_odd_even_fold_central_ones_miss():
    """An odd-even oscillation along x (0.6 voxels up and down on alternate voxels) folds the
    trilinear map between every pair of voxels, but central differences see a constant field (det 1
    inside); forward differences see det J = 1 -/+ 1.2, and fold removal by both takes it away. A
    linear map has the same determinant either way."""
    import torch

    from fmsam.inference import UNFOLD_MIN_DETERMINANT, remove_folds
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import normalised_to_voxels, voxels_to_normalised

    shape = (10, 12, 14)
    voxels = torch.zeros(1, 3, *shape)
    voxels[0, 0] = 0.6 * (torch.arange(shape[2]) % 2 * 2 - 1).float()  # +-0.6 along W
    central, forward = grid_determinant(voxels), grid_determinant(voxels, "forward")
    assert torch.allclose(central[:, :, 1:-1], torch.ones(1)) and float(forward.min()) == pytest.approx(-0.2)
    repaired, report = remove_folds(voxels_to_normalised(voxels))
    assert report["unfold_left_voxels"] == 0 and report["unfold_rounds"] >= 1
    assert float(grid_determinant(normalised_to_voxels(repaired), "corners").min()) >= UNFOLD_MIN_DETERMINANT
    matrix = torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.4]])
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    xyz = grid.flip(0)  # (x, y, z) = (W, H, D) indices
    linear = torch.einsum("ij,jdhw->idhw", matrix, xyz)[None]
    expected = float(torch.linalg.det(torch.eye(3) + matrix))
    for differences in ("central", "forward", "corners"):
        assert torch.allclose(grid_determinant(linear, differences), torch.full(shape, expected), atol=1e-5)
    with pytest.raises(ValueError):
        grid_determinant(linear, "backward")


def test_corner_determinants_see_a_fold_central_and_forward_differences_miss():
    """A random 2 x 2 x 2 patch of displacements (up to 0.7 voxels) whose trilinear map folds at a
    cell corner other than the cell's first one: central and forward differences find det J above
    0.1 everywhere, the minimum over each voxel's 8 corner Jacobians finds -0.21 (checked by hand
    below at one corner), and fold removal, which uses the corners, takes it away."""
    import torch

    from fmsam.inference import UNFOLD_MIN_DETERMINANT, remove_folds
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import normalised_to_voxels, voxels_to_normalised

    voxels = torch.zeros(1, 3, 8, 8, 8)
    voxels[0, :, 3:5, 3:5, 3:5] = (torch.rand(3, 2, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.7
    central, forward, corners = (grid_determinant(voxels, differences) for differences in ("central", "forward", "corners"))
    assert float(central.min()) > 0.1 and float(forward.min()) > 0.1
    assert float(corners.min()) == pytest.approx(-0.2089, abs=1e-3)
    assert bool((corners <= forward + 1e-6).all())  # the forward corner is one of the eight
    # By hand at the worst voxel: the 8 one-sided Jacobians, the least of them the reported value.
    d, h, w = [int(index) for index in torch.nonzero(corners == corners.min())[0]]
    u = voxels[0]
    least = None
    for step_w in (1, -1):
        for step_h in (1, -1):
            for step_d in (1, -1):
                columns = [(u[:, d, h, w + step_w] - u[:, d, h, w]) * step_w,
                           (u[:, d, h + step_h, w] - u[:, d, h, w]) * step_h,
                           (u[:, d + step_d, h, w] - u[:, d, h, w]) * step_d]
                found = float(torch.linalg.det(torch.eye(3) + torch.stack(columns, dim=1)))
                least = found if least is None else min(least, found)
    assert least == pytest.approx(float(corners.min()), abs=1e-5)
    repaired, report = remove_folds(voxels_to_normalised(voxels))
    print(report)
    assert report["unfold_voxels"] >= 1 and report["unfold_left_voxels"] == 0
    assert float(grid_determinant(normalised_to_voxels(repaired), "corners").min()) > 0.0
    assert float(grid_determinant(normalised_to_voxels(repaired)).min()) >= UNFOLD_MIN_DETERMINANT


def test_remove_folds_leaves_a_compressed_but_unfolded_field_alone():
    """A wide band compressed to det J 0.05 (below the margin, never folded) is returned as it was:
    smoothing cannot lift a linear region, so rounds there would only blur its edges."""
    import torch

    from fmsam.inference import remove_folds
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import voxels_to_normalised

    shape = (16, 20, 48)
    w = torch.arange(shape[2], dtype=torch.float32).expand(*shape)
    voxels = torch.zeros(1, 3, *shape)
    voxels[0, 0] = torch.where(w < 12, torch.zeros_like(w), torch.where(w > 36, -0.95 * 24 * torch.ones_like(w),
                                                                           -0.95 * (w - 12)))
    assert 0.0 < float(grid_determinant(voxels).min()) < 0.1
    field = voxels_to_normalised(voxels)
    same, report = remove_folds(field)
    assert torch.equal(same, field)
    assert report == {"unfold_voxels": 0, "unfold_rounds": 0, "unfold_left_voxels": 0, "unfold_max_change_voxels": 0.0}


def test_secant_strides_see_what_a_thick_slice_grid_differentiates():
    """A field with no fold on its own grid whose determinant across 15 voxels (a 2-slice stack's
    23 mm slice over 1.5 mm network voxels) is negative: u_x rises by 60 voxels where u_z has no
    in-plane slope, and u_z slopes in-plane (0.3) only in the first planes, so a secant from a first
    plane to the last pairs the two. grid_determinant with that stride finds it, fold removal with
    the stride takes it away, and without the stride nothing is seen or changed."""
    import torch

    from fmsam.inference import remove_folds, secant_strides
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import normalised_to_voxels, voxels_to_normalised

    shape = (16, 20, 24)
    d = torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1)
    w = torch.arange(shape[2], dtype=torch.float32).view(1, 1, -1) - (shape[2] - 1) / 2
    voxels = torch.zeros(1, 3, *shape)
    voxels[0, 0] = (60.0 * torch.clamp((d - 4) / 8, 0, 1)).expand(shape)
    voxels[0, 2] = (0.3 * torch.clamp(1 - d / 4, min=0) * w).expand(shape)
    strides = secant_strides((23.0, 0.73, 0.73), (23.0 / 15, 2.2, 2.2))
    assert strides == (15, 1, 1)
    assert float(grid_determinant(voxels, "corners").min()) == pytest.approx(0.1375, abs=1e-4)
    secant = grid_determinant(voxels, "corners", strides)
    assert float(secant.min()) == pytest.approx(-0.43, abs=1e-3) and int((secant <= 0).sum()) == 580
    # At the first plane, by hand: columns along W and H at that plane, the secant to plane 15 along D.
    u = voxels[0, :, 0, 0, -1]
    columns = torch.stack([voxels[0, :, 0, 0, -1] - voxels[0, :, 0, 0, -2], torch.zeros(3),
                           (voxels[0, :, 15, 0, -1] - u) / 15], dim=1)
    assert float(torch.linalg.det(torch.eye(3) + columns)) == pytest.approx(-0.43, abs=1e-3)
    field = voxels_to_normalised(voxels)
    same, report = remove_folds(field)
    assert torch.equal(same, field) and report["unfold_voxels"] == 0
    repaired, report = remove_folds(field, strides=strides)
    assert report["unfold_voxels"] == 580 and report["unfold_left_voxels"] == 0 and report["unfold_rounds"] >= 1
    assert float(grid_determinant(normalised_to_voxels(repaired), "corners", strides).min()) > 0.1
    assert secant_strides((2.0, 1.0, 0.9), (2.2, 2.5, 2.5)) == (1, 1, 1)  # a brain: nothing changes
    with pytest.raises(ValueError):
        grid_determinant(voxels, "central", strides)  # central differences take no stride
