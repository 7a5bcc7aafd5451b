"""Affine pre-alignment: recovers a known affine, refines a perturbed one, reports progress."""
import numpy as np
import pytest
import SimpleITK as sitk

from fmsam import fields
from fmsam.errors import Cancelled
from fmsam.intensity import normalised_image
from fmsam.prealign import affine_prealign


@pytest.fixture(scope="module")
def known_pair(sample_paths):
    """The sample's fixed image (normalised) and a copy moved by a known affine (fixed -> moving)."""
    fixed = normalised_image(sitk.ReadImage(sample_paths["fixed"], sitk.sitkFloat32), "mr")[0]
    known = sitk.AffineTransform(3)
    known.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()]))
    rotation = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(6.0)).GetMatrix()
    scaled = np.array(rotation).reshape(3, 3) @ np.diag([1.06, 0.97, 1.02])
    known.SetMatrix(scaled.ravel().tolist())
    known.SetTranslation((5.0, -3.0, 4.0))
    # The moving image is the fixed one seen through the inverse map, so that fixed point x and
    # moving point known(x) show the same anatomy.
    moving = fields.resample(fixed, fixed, known.GetInverse())
    return fixed, moving, known


def head_points(fixed):
    voxels = sitk.GetArrayViewFromImage(fixed)
    k, j, i = np.nonzero(voxels > 0.2)
    index = np.stack([i, j, k], axis=1)[::97].astype(np.float64)
    return np.array([fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in index])


def mapping_error_mm(found, known, points):
    return np.linalg.norm(fields.affine_apply(found, points) - fields.affine_apply(known, points), axis=1)


def test_recovers_a_known_affine(known_pair):
    fixed, moving, known = known_pair
    points = head_points(fixed)
    assert np.mean(mapping_error_mm(sitk.AffineTransform(3), known, points)) > 5.0  # a real motion
    error = mapping_error_mm(affine_prealign(fixed, moving), known, points)
    assert np.mean(error) < 1.0 and np.percentile(error, 99) < 2.0  # voxels are 2 mm


def test_refines_a_perturbed_affine_without_the_rigid_stage(known_pair):
    fixed, moving, known = known_pair
    points = head_points(fixed)
    perturbed = sitk.AffineTransform(known)
    perturbed.SetTranslation(np.add(known.GetTranslation(), (2.5, 2.0, -2.0)).tolist())
    fractions = []
    refined = affine_prealign(fixed, moving, initial=perturbed, progress=fractions.append)
    assert np.mean(mapping_error_mm(perturbed, known, points)) > 3.0
    assert np.mean(mapping_error_mm(refined, known, points)) < 1.0
    assert perturbed.GetTranslation() != refined.GetTranslation()  # the initial one is not changed
    assert fractions and fractions == sorted(fractions) and 0 < fractions[-1] < 1


def test_cancelling_stops_the_optimiser(known_pair):
    fixed, moving, _ = known_pair
    calls = []

    def cancel_at_third(fraction):
        calls.append(fraction)
        if len(calls) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        affine_prealign(fixed, moving, progress=cancel_at_third)
    assert len(calls) == 3  # later levels and the affine stage were skipped at once
