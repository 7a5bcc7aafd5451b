"""Thin, anisotropic stacks (issue 14): cardiac short-axis MR of 2-6 slices 12-23 mm thick.

A synthetic stack the suite makes itself (every clone runs it), and real stacks of the MyoPS
"selection" patients (Testing/Benchmarks/cardiac_split.json) from ../shared/data when present.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from fmsam import fields
from fmsam.jacobian import jacobian_determinant
from fmsam.overview import display_axis
from fmsam.intensity import normalised_image
from fmsam.prealign import affine_prealign, alignment_score, fits_pyramid, level_image
from fmsam.quality import normalised_mutual_information

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARDIAC = os.path.join(ROOT, "..", "shared", "data", "cardiac_myops")
SPLIT = json.load(open(os.path.join(ROOT, "Testing", "Benchmarks", "cardiac_split.json")))
#: Largest folding the issue accepts on a cardiac pair (percent of fixed voxels with det J <= 0).
MAX_FOLDING_PERCENT = 0.05


def phantom(shift_mm=(0.0, 0.0), slices=3, size=96, spacing=(1.5, 1.5, 15.0)):
    """A smooth short-axis-like stack (i, j in plane, k across 15 mm slices): a body ellipse, a
    bright blood pool inside a darker ring that shrinks from slice to slice, and a bright spot,
    all moved in plane by ``shift_mm`` (x = i, y = j, LPS mm). uint8-like values 0-250, float32."""
    k, j, i = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    x = (i - size / 2.0) * spacing[0] - shift_mm[0]
    y = (j - size / 2.0) * spacing[1] - shift_mm[1]
    smooth = lambda d, w: 1.0 / (1.0 + np.exp(d / w))  # noqa: E731  (1 inside, 0 outside)
    body = smooth(np.hypot(x / 62.0, y / 48.0) - 1.0, 0.03)
    radius = np.hypot(x - 10.0, y + 5.0)
    ring_outer = 24.0 - 3.0 * k
    pool = smooth(radius - (ring_outer - 9.0), 1.2)
    ring = smooth(radius - ring_outer, 1.2) - pool
    spot = np.exp(-((x + 30.0) ** 2 + (y - 20.0) ** 2) / 60.0)
    voxels = 90.0 * body + 140.0 * pool - 50.0 * ring + 100.0 * spot * body
    image = sitk.GetImageFromArray(np.clip(voxels, 0, 250).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-70.0, 20.0, -30.0))
    return image


def foreground_nmi(fixed, moving_on_fixed):
    fixed_values = normalised_image(fixed, "mr")[0]
    moving_values = normalised_image(moving_on_fixed, "mr")[0]
    fixed_array, moving_array = (sitk.GetArrayFromImage(image) for image in (fixed_values, moving_values))
    inside = fixed_array > 0.05
    return normalised_mutual_information(fixed_array[inside], moving_array[inside])


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thin")
    paths = {"fixed": str(folder / "fixed.nii.gz"), "moving": str(folder / "moving.nii.gz")}
    sitk.WriteImage(sitk.Cast(phantom(), sitk.sitkUInt8), paths["fixed"])
    sitk.WriteImage(sitk.Cast(phantom(shift_mm=(4.5, -3.0)), sitk.sitkUInt8), paths["moving"])
    return paths


def test_level_images_keep_thin_axes_and_the_extent():
    stack = phantom(slices=3)
    assert not fits_pyramid(stack, (4, 2)) and fits_pyramid(sitk.Image([64, 64, 64], sitk.sitkFloat32), (4, 2))
    level = level_image(stack, 4)
    assert level.GetSize() == (24, 24, 4)  # in plane shrunk by 4, the 3 slices resampled to 4
    assert np.allclose(level.GetSpacing(), (6.0, 6.0, 11.25))
    for image in (stack, level):  # the buffer spans the same physical extent
        start = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
        end = image.TransformContinuousIndexToPhysicalPoint([n - 0.5 for n in image.GetSize()])
        assert np.allclose(start, stack.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
        assert np.allclose(end, stack.TransformContinuousIndexToPhysicalPoint(
            [n - 0.5 for n in stack.GetSize()]))
    assert level_image(phantom(slices=2), 2).GetSize() == (48, 48, 4)


@pytest.mark.parametrize("slices", [2, 3])
def test_prealignment_finds_an_in_plane_shift_and_does_no_harm_on_an_identical_pair(slices):
    fixed = normalised_image(phantom(slices=slices), "mr")[0]
    moving = normalised_image(phantom(shift_mm=(4.5, -3.0), slices=slices), "mr")[0]
    found = affine_prealign(fixed, moving)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([47.5, 47.5, (slices - 1) / 2.0]))
    moved = fields.affine_apply(found, centre[None])[0] - centre
    assert np.allclose(moved[:2], (4.5, -3.0), atol=1.0), moved
    assert abs(moved[2]) < 3.0  # a fifth of a slice
    same = affine_prealign(fixed, fixed)
    identity = sitk.AffineTransform(3)
    assert alignment_score(fixed, fixed, same) >= alignment_score(fixed, fixed, identity)
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(p) for p in
                       ([0, 0, 0], [95, 95, slices - 1], [20, 70, 1])])
    assert np.abs(fields.affine_apply(same, points) - points).max() < 0.5  # mm: no harm done


def test_jacobian_of_two_and_three_slices_is_finite_and_exact_for_a_linear_map():
    for slices in (1, 2, 3):
        grid = phantom(slices=slices, size=12)
        centres = np.stack(np.meshgrid(*[np.arange(n) for n in grid.GetSize()[::-1]], indexing="ij"), -1)
        matrix = np.array([[0.1, 0.02, 0.0], [0.0, -0.05, 0.01], [0.03, 0.0, 0.2]])
        field = (centres[..., ::-1] * grid.GetSpacing()) @ matrix.T  # linear in LPS mm
        determinant = jacobian_determinant(field, grid)
        assert np.all(np.isfinite(determinant))
        expected = np.linalg.det(np.eye(3) + matrix) if slices > 1 else np.linalg.det(
            np.eye(2) + matrix[:2, :2])
        assert np.allclose(determinant, expected), slices


def test_overview_shows_the_slice_plane_of_a_stack_stored_either_way():
    assert display_axis((3, 480, 480)) == 0
    assert display_axis((480, 480, 4)) == 2
    assert display_axis((90, 120, 120)) == 0  # a head: axial, as before


def test_synthetic_thin_stack_registers(synthetic_pair, tmp_path):
    from fmsam.cli import main

    out = str(tmp_path / "out")
    assert main(["register", synthetic_pair["fixed"], synthetic_pair["moving"], "--out", out, "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["folding_percent"] < MAX_FOLDING_PERCENT
    assert min(report["network_grid"]) >= 16
    assert report["slice_refinement"]["applied"] and report["slice_refinement"]["planes"][0] == 3  # by default
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "jacobian.nii.gz")))
    assert jacobian.shape == (3, 96, 96) and np.all(np.isfinite(jacobian))
    fixed = sitk.ReadImage(synthetic_pair["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(synthetic_pair["moving"], sitk.sitkFloat32)
    warped = sitk.ReadImage(os.path.join(out, "warped.nii.gz"), sitk.sitkFloat32)
    unregistered = fields.resample(moving, fixed, sitk.Transform())
    before = np.abs(sitk.GetArrayFromImage(unregistered) - sitk.GetArrayFromImage(fixed)).mean()
    after = np.abs(sitk.GetArrayFromImage(warped) - sitk.GetArrayFromImage(fixed)).mean()
    assert after < 0.5 * before, (before, after)
    assert foreground_nmi(fixed, warped) > foreground_nmi(fixed, unregistered)
    assert os.path.getsize(os.path.join(out, "overview.png")) > 10000


def cardiac(name):
    path = os.path.join(CARDIAC, name + ".nii.gz")
    if not os.path.isfile(path):
        pytest.skip("real cardiac stacks not found (%s): ../shared/data/cardiac_myops is absent" % CARDIAC)
    return path


@pytest.mark.parametrize("fixed, moving", [
    ("102_DE", "103_DE"),   # two patients, one sequence (LGE), 3 slices of 23 mm and of 12 mm
    ("111_DE", "111_C0"),   # one patient, LGE <- bSSFP, the only 2-slice stack
])
def test_real_selection_stacks_register_without_folding_and_improve_similarity(fixed, moving, tmp_path):
    for patient in (fixed, moving):
        assert int(patient.split("_")[0]) in SPLIT["selection"]  # never a report patient
    from fmsam.cli import main

    fixed_path, moving_path = cardiac(fixed), cardiac(moving)
    out = str(tmp_path / "out")
    assert main(["register", fixed_path, moving_path, "--out", out, "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["folding_percent"] < MAX_FOLDING_PERCENT
    assert report["warnings"] == []  # the failure warning judges thin stacks by their relative gain
    fixed_image = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    warped = sitk.ReadImage(os.path.join(out, "warped.nii.gz"), sitk.sitkFloat32)
    unregistered = fields.resample(sitk.ReadImage(moving_path, sitk.sitkFloat32), fixed_image, sitk.Transform())
    assert foreground_nmi(fixed_image, warped) > foreground_nmi(fixed_image, unregistered) + 0.005


def test_prealignment_survives_a_start_where_the_images_do_not_overlap():
    fixed = normalised_image(phantom(slices=2), "mr")[0]
    far = sitk.AffineTransform(3)
    far.SetTranslation((0.0, 0.0, 900.0))  # every fixed point maps far outside the moving stack
    with pytest.raises(RuntimeError):  # what ITK does on its own
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(32)
        method.SetInitialTransform(far)
        method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 5)
        method.Execute(level_image(fixed, 1), level_image(fixed, 1))
    found = affine_prealign(fixed, fixed, initial=far)  # no exception: the identity wins
    assert found.GetTranslation() == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)


def test_thin_stacks_get_a_full_resolution_level_that_is_kept_only_when_it_scores_higher(monkeypatch):
    from fmsam import prealign

    fixed = normalised_image(phantom(slices=3, spacing=(0.75, 0.75, 15.0), size=160), "mr")[0]
    moving = normalised_image(phantom(shift_mm=(2.6, -1.7), slices=3, spacing=(0.75, 0.75, 15.0), size=160),
                              "mr")[0]
    levels_run = []
    original = prealign._run_stage
    monkeypatch.setattr(prealign, "_run_stage", lambda transform, levels, *rest: (
        levels_run.append(tuple(levels)), original(transform, levels, *rest))[1])
    refined = affine_prealign(fixed, moving)
    assert levels_run == [prealign.RIGID_LEVELS, prealign.AFFINE_LEVELS, prealign.THIN_FINE_LEVELS]
    levels_run.clear()
    affine_prealign(fixed, moving, both_ways=True)  # the other direction too, then the fine level once
    assert levels_run == [prealign.RIGID_LEVELS, prealign.AFFINE_LEVELS] * 2 + [prealign.THIN_FINE_LEVELS]
    levels_run.clear()
    monkeypatch.setattr(prealign, "THIN_FINE_LEVELS", ())
    coarse = affine_prealign(fixed, moving)
    assert alignment_score(fixed, moving, refined) >= alignment_score(fixed, moving, coarse)
    head = sitk.Image([64, 64, 48], sitk.sitkFloat32)  # fits ITK's pyramid: no extra level
    head = sitk.SmoothingRecursiveGaussian(sitk.AdditiveGaussianNoise(head, 1.0, 0.0, 1), 3.0)
    levels_run.clear()
    monkeypatch.setattr(prealign, "THIN_FINE_LEVELS", (1,))
    affine_prealign(head, head)
    assert levels_run == [prealign.RIGID_LEVELS, prealign.AFFINE_LEVELS]
