"""The label-free check: the deformable step must raise mutual information, or the report warns."""
import json
import os

import SimpleITK as sitk

import fmsam
from fmsam.quality import MIN_GAIN, mutual_information


def test_a_good_registration_raises_mutual_information_without_warning(registered_sample):
    with open(os.path.join(registered_sample, "report.json")) as handle:
        report = json.load(handle)
    assert report["mi_registered"] > report["mi_affine"] + MIN_GAIN
    assert report["warnings"] == []


def test_mutual_information_prefers_aligned_images(sample_paths):
    fixed = sitk.ReadImage(sample_paths["fixed"], sitk.sitkFloat32)
    shifted = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (6.0, 0.0, 0.0)), sitk.sitkLinear)
    assert mutual_information(fixed, fixed) > mutual_information(fixed, shifted) + 0.2


def test_inverted_contrast_earns_a_warning(sample_paths, inverted_moving, tmp_path, capsys):
    """Without contrast matching, the model cannot register a T1 to an inverted (T2-like) image; the
    user is told so."""
    from fmsam.cli import main

    assert main(["register", sample_paths["fixed"], inverted_moving, "--out", str(tmp_path / "out"), "--quiet",
                 "--contrast-matching", "off"]) == 0
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert report["mi_registered"] - report["mi_affine"] < MIN_GAIN
    assert len(report["warnings"]) == 1 and "contrast" in report["warnings"][0]
    assert "fmsam: warning:" in capsys.readouterr().err
    # The same pair the right way round: no warning (the check is about the contrast, not the pair).
    assert fmsam.register(sample_paths["fixed"], sample_paths["moving"]).report["warnings"] == []
