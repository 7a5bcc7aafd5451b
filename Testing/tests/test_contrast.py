"""Contrast matching: a moving image of another contrast is given the fixed image's contrast before
the network, and only when the contrasts differ ('auto')."""
import json

import numpy as np
import pytest

import fmsam
from fmsam.contrast import MIN_CORRELATION_GAIN, apply_lookup, contrast_decision, contrast_lookup
from fmsam.errors import InputError


def _phantom(seed=0, shape=(40, 48, 48)):
    """Background (0) and three smooth tissue classes of T1-like intensities 0.3, 0.6, 0.9."""
    generator = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x ** 2 + y ** 2 + z ** 2) < 0.8
    texture = np.sin(4 * x + 2 * y) + np.cos(3 * z - y)
    tissue = np.digitize(texture, [-0.5, 0.5])  # 0, 1, 2
    intensities = np.array([0.3, 0.6, 0.9])
    image = np.where(head, intensities[tissue], 0.0) + 0.01 * generator.standard_normal(shape)
    return np.clip(image, 0.0, 1.0), head, tissue


def _correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_inverted_tissue_contrast_is_recovered_with_a_dark_background():
    fixed, head, tissue = _phantom(0)
    noise = 0.01 * np.random.default_rng(5).standard_normal(fixed.shape)
    inverted = np.clip(np.where(head, np.array([0.9, 0.6, 0.3])[tissue], 0.0) + noise, 0, 1)  # T2-like
    assert _correlation(fixed[head], inverted[head]) < -0.9
    lookup, gain = contrast_decision(fixed, inverted)
    matched = apply_lookup(lookup, inverted)
    assert _correlation(fixed, matched) > 0.98 and _correlation(fixed[head], matched[head]) > 0.9
    assert gain > 10 * MIN_CORRELATION_GAIN
    # Per class, the matched image has the fixed image's intensity (background stays dark).
    for label, value in enumerate([0.3, 0.6, 0.9]):
        assert abs(float(np.median(matched[head & (tissue == label)])) - value) < 0.05
    assert float(np.median(matched[~head])) < 0.05


def test_same_contrast_is_left_almost_unchanged_and_not_matched_by_auto():
    fixed, _, _ = _phantom(0)
    moving, _, _ = _phantom(1)  # same anatomy and contrast, other noise
    lookup, gain = contrast_decision(fixed, moving)
    matched = apply_lookup(lookup, moving)
    assert gain < MIN_CORRELATION_GAIN
    assert float(np.mean(np.abs(matched - moving))) < 0.02


def test_mapping_can_be_applied_to_another_grid():
    fixed, head, tissue = _phantom(0)
    inverted = np.where(head, np.array([0.9, 0.6, 0.3])[tissue], 0.0)
    coarse = apply_lookup(contrast_lookup(fixed, inverted), inverted[::2, ::2, ::2])
    assert coarse.shape == inverted[::2, ::2, ::2].shape
    assert _correlation(fixed[::2, ::2, ::2], coarse) > 0.98


def test_a_monotone_contrast_change_is_undone_exactly():
    """Conditional means alone would squeeze the intensities; the histogram-matching step restores
    the fixed image's own values."""
    fixed, _, _ = _phantom(0)
    moving = fixed ** 2.5  # gamma-changed copy, perfectly aligned
    matched = apply_lookup(contrast_lookup(fixed, moving), moving)
    assert float(np.mean(np.abs(matched - fixed))) < 0.01


def test_registration_of_an_inverted_contrast_pair_is_rescued(sample_paths, inverted_moving, tmp_path, capsys):
    """Measured on the sample pair: Dice 0.25 without matching, 0.43 with it (first affine 0.43)."""
    from fmsam.cli import main

    path = inverted_moving
    common = ["--fixed-labels", sample_paths["fixed_labels"], "--moving-labels", sample_paths["moving_labels"],
              "--quiet", "--device", "cpu"]
    assert main(["register", sample_paths["fixed"], path, "--out", str(tmp_path / "auto")] + common) == 0
    assert "contrast matched" in capsys.readouterr().out
    assert main(["register", sample_paths["fixed"], path, "--out", str(tmp_path / "off"),
                 "--contrast-matching", "off"] + common) == 0
    auto = json.load(open(tmp_path / "auto" / "report.json"))
    off = json.load(open(tmp_path / "off" / "report.json"))
    assert auto["contrast_matching"]["applied"] and not off["contrast_matching"]["applied"]
    assert auto["contrast_matching"]["correlation_gain"] > MIN_CORRELATION_GAIN
    assert auto["dice_after"] > off["dice_after"] + 0.1
    assert auto["dice_after"] > auto["dice_affine"] - 0.05


def test_a_same_contrast_pair_is_not_matched(registered_sample):
    report = json.load(open(registered_sample + "/report.json"))
    assert report["contrast_matching"]["applied"] is False
    assert report["contrast_matching"]["correlation_gain"] < MIN_CORRELATION_GAIN
    assert report["slice_refinement"] == {"applied": False}  # a head is not a stack of thick slices


def test_unknown_setting_is_refused(sample_paths):
    with pytest.raises(InputError, match="contrast_matching"):
        fmsam.register(sample_paths["fixed"], sample_paths["moving"], contrast_matching="sometimes")


def test_progress_never_goes_back_when_the_affine_is_refined(sample_paths, inverted_moving):
    """With matching, the affine runs twice within one stage; its progress must still only rise."""
    seen = []
    result = fmsam.register(sample_paths["fixed"], inverted_moving, device="cpu", contrast_matching="on",
                            progress=lambda stage, fraction: seen.append((stage, fraction)))
    assert result.report["contrast_matching"]["applied"]
    affine = [fraction for stage, fraction in seen if stage == "affine"]
    assert len(affine) > 100 and affine[-1] == 1.0  # every optimiser iteration of both runs
    for stage in {stage for stage, _ in seen}:
        fractions = [fraction for name, fraction in seen if name == stage]
        assert fractions == sorted(fractions), stage
