"""The network grid of a fixed image (:func:`fmsam.inference.grid_for`): the model's voxel budget,
raised for images with many voxels in fast mode (issue 15, trial G2; accurate mode keeps the budget, trial
H1), kept for 2 mm heads, cardiac stacks and the trainer's one-voxel probes."""
import numpy as np
import SimpleITK as sitk

import fmsam.inference as inference

BUDGET = {"grid": [80, 100, 100]}  # the bundled model's


def image(size_ijk, spacing_ijk):
    result = sitk.Image([int(n) for n in size_ijk], sitk.sitkUInt8)
    result.SetSpacing([float(s) for s in spacing_ijk])
    return result


def spacing_mm(picture, grid):
    return np.array(picture.GetSize()[::-1]) * np.array(picture.GetSpacing()[::-1]) / np.array(grid)


def test_a_1mm_brain_gets_a_finer_grid_at_a_raised_budget():
    oasis = image((160, 192, 144), (1.0, 1.0, 1.0))  # 4.4 M voxels, brain only
    grid = inference.grid_for(oasis, BUDGET)
    assert grid == (96, 128, 104)
    assert np.prod(grid) <= 1.05 * inference.MAX_NETWORK_VOXELS
    assert np.all(np.abs(spacing_mm(oasis, grid) - 1.5) < 0.06)  # 1.8 mm at the budget
    accurate = inference.grid_for(oasis, BUDGET, accurate=True)  # accurate mode keeps the budget (trial H1)
    assert np.prod(accurate) <= 1.05 * np.prod(BUDGET["grid"])
    assert np.all(np.abs(spacing_mm(oasis, accurate) - 1.8) < 0.1)


def test_heads_stacks_and_probes_keep_the_budget_grid():
    head = image((120, 120, 90), (2.0, 2.0, 2.0))  # a 2 mm IXI head: 1.3 M voxels
    assert inference.grid_for(head, BUDGET) == (80, 104, 104)
    stack = image((480, 480, 4), (0.73, 0.73, 15.0))  # a short-axis stack: 0.9 M voxels
    assert inference.grid_for(stack, BUDGET) == (32, 168, 168)
    probe = image((1, 1, 1), (240.0, 240.0, 180.0))  # Training/anatomy.network_grid's probe
    assert inference.grid_for(probe, {"grid": [64, 80, 80]}) == (64, 80, 80)


def test_the_raised_budget_stops_at_its_cap():
    ct = image((512, 512, 300), (0.8, 0.8, 1.0))  # 79 M voxels
    grid = inference.grid_for(ct, BUDGET)
    assert 0.9 * inference.MAX_NETWORK_VOXELS <= np.prod(grid) <= 1.1 * inference.MAX_NETWORK_VOXELS


def test_fast_and_accurate_mode_each_raise_the_budget_by_their_own_fraction(small_pair, small_network_grid,
                                                                            monkeypatch):
    """Through the whole registration: the grid the report names follows the mode's own fraction
    (the fixture's budget is 16 x 16 x 16 = 4096 voxels; the small images have 5760, so a fraction of 3
    raises it)."""
    import fmsam

    def grid_of(fast_fraction, accurate_fraction, io_steps):
        monkeypatch.setattr(inference, "NETWORK_VOXELS_PER_IMAGE_VOXEL", fast_fraction)
        monkeypatch.setattr(inference, "ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL", accurate_fraction)
        return tuple(fmsam.register(*small_pair, device="cpu", io_steps=io_steps).report["network_grid"])

    raised = (32, 24, 24)  # the small fixed image's grid at 3 x 5760 voxels (16 x 16 x 16 with no raise)
    assert grid_of(3.0, 0.0, 0) == raised
    assert grid_of(3.0, 0.0, 2) == (16, 16, 16)
    assert grid_of(0.0, 3.0, 0) == (16, 16, 16)
    assert grid_of(0.0, 3.0, 2) == raised


def test_accurate_mode_on_a_refined_stack_runs_fast_modes_fields_on_fast_modes_grid(small_network_grid,
                                                                                      monkeypatch):
    """Slice refinement replaces accurate mode's instance optimisation on a thick-slice stack, so the
    fields there are fast mode's, on fast mode's grid; with the refinement off, accurate mode's grid."""
    import fmsam
    from test_thin_stacks import phantom

    monkeypatch.setattr(inference, "NETWORK_VOXELS_PER_IMAGE_VOXEL", 3.0)  # 3 x 27 648 voxels: raised
    monkeypatch.setattr(inference, "ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL", 0.0)
    fixed, moving = phantom(), phantom(shift_mm=(3.0, -2.0))
    fast = fmsam.register(fixed, moving, device="cpu").report
    refined = fmsam.register(fixed, moving, device="cpu", io_steps=2).report
    volume = fmsam.register(fixed, moving, device="cpu", io_steps=2, slice_refinement="off").report
    assert refined["io_steps_run"] == 0 and volume["io_steps_run"] == 2
    assert refined["network_grid"] == fast["network_grid"]
    assert np.prod(fast["network_grid"]) > 10 * np.prod(volume["network_grid"])
