"""Intensity normalisation: the CT mapping (Hounsfield units through fixed knots), the MR
percentiles, the automatic choice, and the trainer's CT rendering using the engine's mapping."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
import fmsam.intensity as intensity
from fmsam.intensity import CT_KNOTS_HU, detect_modality, hounsfield_to_unit, normalise

sys.path.insert(0, os.path.join(ROOT, "Training"))  # the trainer's modules are scripts, not a package


def test_ct_mapping_is_the_soft_tissue_window():
    """-150 HU (fat) -> 0, 250 HU -> 1, linear between (W400/L50, the abdominal window): liver
    (60 HU) and kidney (160 HU) are 0.25 apart, not 0.05 as in a -1000..1000 window."""
    assert CT_KNOTS_HU == ((-150.0, 0.0), (250.0, 1.0))
    values = hounsfield_to_unit(np.array([-1000.0, -150.0, 50.0, 60.0, 160.0, 250.0, 1000.0], np.float32))
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, [0.0, 0.0, 0.5, 0.525, 0.775, 1.0, 1.0], atol=1e-6)


def test_piecewise_knots_interpolate_and_clip(monkeypatch):
    monkeypatch.setattr(intensity, "CT_KNOTS_HU", ((-1000.0, 0.0), (-200.0, 0.1), (300.0, 0.9), (1500.0, 1.0)))
    values = hounsfield_to_unit(np.array([[-2000.0, -600.0], [50.0, 900.0], [3000.0, -200.0]]))
    np.testing.assert_allclose(values, [[0.0, 0.05], [0.5, 0.95], [1.0, 0.1]], atol=1e-6)
    assert values.shape == (3, 2)


def test_normalise_ct_mr_and_auto():
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1000.0, np.float32)  # air around a body of soft tissue
    ct[5:15, 5:15, 5:15] = 50.0 + 10.0 * rng.standard_normal((10, 10, 10))
    assert detect_modality(ct) == "ct"
    auto, used = normalise(ct)
    assert used == "ct"
    np.testing.assert_array_equal(auto, hounsfield_to_unit(ct))
    assert auto[0, 0, 0] == 0.0 and abs(float(np.median(auto[5:15, 5:15, 5:15])) - 0.5) < 0.02
    mr = 100.0 + 400.0 * rng.random((20, 20, 20)).astype(np.float32)  # no air: MR path
    values, used = normalise(mr)
    assert used == "mr"
    low, high = np.percentile(mr, intensity.MR_PERCENTILES)
    np.testing.assert_allclose(values, np.clip((mr - low) / (high - low), 0, 1), atol=1e-6)
    with pytest.raises(ValueError):
        normalise(mr, "pet")


def test_trainer_renders_ct_through_the_engine_mapping():
    """anatomy.render_ct is render_ct_hounsfield mapped by hounsfield_to_unit: the network trains on
    what the engine gives it at inference."""
    from anatomy import ORGAN_HU, render_ct, render_ct_hounsfield

    labels = torch.zeros(1, 1, 12, 14, 16)
    labels[:, :, 3:9, 4:10, 5:12] = 1
    labels[:, :, 5:7, 6:8, 7:9] = 8
    hu = torch.tensor(ORGAN_HU)
    rendered = render_ct(torch.Generator().manual_seed(3), labels, hu, 15.0)
    hounsfield = render_ct_hounsfield(torch.Generator().manual_seed(3), labels, hu, 15.0)
    assert rendered.shape == labels.shape and rendered.dtype == torch.float32
    np.testing.assert_allclose(rendered.numpy(), hounsfield_to_unit(hounsfield.numpy()), atol=1e-6)
    # label 1 (50 HU) is mid-range, well inside the window
    assert 0.35 < float(rendered[0, 0, 4, 5, 6]) < 0.65
