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


def _label_dice(fixed_labels, moving_labels, transform):
    """Mean Dice as ``fmsam evaluate`` reports it (labels of both maps) after ``transform``."""
    from fmsam.metrics import labels_in_both, mean_dice

    fixed, moving = sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(moving_labels)
    warped = sitk.GetArrayFromImage(fields.resample(moving_labels, fixed_labels, transform, nearest=True))
    return mean_dice(fixed, warped, labels_in_both(fixed, moving))


def test_a_skull_stripped_moving_image_is_aligned_through_the_other_direction(sample_paths, stripped_moving):
    """A head with its skull fixed, a skull-stripped brain moving: the alignment that way stops far
    from the brain (all that the default, one way, has); with ``both_ways`` the one the other way
    round is right, and the score picks it."""
    from fmsam.prealign import _Progress, _rigid_then_affine, affine_inputs, alignment_score

    fixed = normalised_image(sitk.ReadImage(sample_paths["fixed"], sitk.sitkFloat32), "mr")[0]
    moving = normalised_image(sitk.ReadImage(stripped_moving, sitk.sitkFloat32), "mr")[0]
    labels = sitk.ReadImage(sample_paths["fixed_labels"]), sitk.ReadImage(sample_paths["moving_labels"])
    fixed, moving, shrunk = affine_inputs(fixed, moving)
    one_way, _ = _rigid_then_affine(fixed, moving, 60, 0.10, _Progress(None, 1), shrunk)
    fractions = []
    assert affine_prealign(fixed, moving, shrunk=shrunk).GetParameters() == one_way.GetParameters()
    found = affine_prealign(fixed, moving, shrunk=shrunk, both_ways=True, progress=fractions.append)
    assert _label_dice(*labels, one_way) < 0.35
    assert _label_dice(*labels, found) > 0.42  # 0.448 (0.273 one way; the head unstripped: about 0.46)
    assert alignment_score(fixed, moving, found) > alignment_score(fixed, moving, one_way)
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1


def test_an_itk_error_while_cancelling_comes_out_as_the_cancel(monkeypatch):
    """ITK's own error in a stage stopped by the callback: the callback's exception is raised."""
    from fmsam import prealign

    progress = prealign._Progress(lambda fraction: None, 10)
    progress.cancelled = Cancelled()

    def itk_gives_up(self, method, fixed, moving):
        raise RuntimeError("ITK ERROR: All samples map outside moving image buffer")

    monkeypatch.setattr(prealign._Progress, "execute", itk_gives_up)
    image = sitk.Image([16, 16, 16], sitk.sitkFloat32)
    with pytest.raises(Cancelled):
        prealign._run_stage(sitk.AffineTransform(3), (2,), image, image, 5, 0.1, progress)
    progress.cancelled = None  # not cancelled: ITK's error ends the stage, the transform kept
    transform = sitk.AffineTransform(3)
    prealign._run_stage(transform, (2,), image, image, 5, 0.1, progress)
    assert transform.GetParameters() == sitk.AffineTransform(3).GetParameters()


def test_accurate_mode_aligns_both_ways_and_fast_mode_when_the_moving_image_shows_much_less(
        sample_paths, stripped_moving, monkeypatch):
    from fmsam import pipeline

    asked = []
    original = pipeline.affine_prealign

    def recording(*args, **kwargs):
        asked.append(kwargs.get("both_ways"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "affine_prealign", recording)
    for io_steps, expected in ((0, False), (1, True)):
        asked.clear()
        result = pipeline.register(sample_paths["fixed"], sample_paths["moving"], io_steps=io_steps, device="cpu")
        assert asked and asked[0] is expected  # the first (not the contrast-matching refinement) call
        assert result.report["affine_both_ways"] is expected
    # Fast mode, a skull-stripped brain moving onto a head: both ways, and the network starts from
    # the right place (Dice 0.537; 0.432 from the one-way affine, which is 0.273 alone).
    asked.clear()
    result = pipeline.register(sample_paths["fixed"], stripped_moving, sample_paths["fixed_labels"],
                               sample_paths["moving_labels"], device="cpu")
    assert asked[0] is True and result.report["affine_both_ways"] is True
    assert result.report["dice_affine"] > 0.42 and result.report["dice_after"] > 0.5
    # Without the pre-alignment there is no affine to run either way.
    result = pipeline.register(sample_paths["fixed"], sample_paths["moving"], prealign=False, io_steps=1, device="cpu")
    assert result.report["affine_both_ways"] is False


def test_the_moving_image_shows_much_less_by_foreground_volume_in_millimetres():
    from fmsam.prealign import SMALLER_MOVING_RATIO, foreground_volume, moving_shows_much_less

    def cube(side, spacing=1.0):
        voxels = np.zeros((40, 40, 40), np.float32)
        voxels[:side, :side, :side] = 0.8
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing([spacing] * 3)
        return image

    assert foreground_volume(cube(10, 2.0)) == pytest.approx(8000.0)
    large, small = cube(30), cube(20)  # 27 000 and 8 000 mm^3: 0.296
    assert SMALLER_MOVING_RATIO == 0.5
    assert moving_shows_much_less(large, small)
    assert not moving_shows_much_less(small, large)    # the large moving onto the small: one way does
    assert not moving_shows_much_less(large, large)
    assert not moving_shows_much_less(large, cube(24))  # 13 824 mm^3: 0.512
    assert not moving_shows_much_less(large, cube(20, 2.0))  # fewer voxels but 64 000 mm^3
