"""Slice refinement (fmsam.slice_refinement): each slice of a thick-slice stack gets its own
in-plane correction after the network."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import fmsam.jacobian as jacobian
import fmsam.slice_refinement as slice_refinement
from fmsam.jacobian import grid_determinant
from fmsam.layers import compose, identity_grid, normalised_to_voxels, resize, voxels_to_normalised, warp
from fmsam.slice_refinement import (between_slices, from_stack_layout, plane_shape, refine_slices, slice_planes,
                                    stack_axis, to_stack_layout)


def test_stacks_are_told_by_the_ratio_of_slice_to_in_plane_spacing():
    assert stack_axis((23.0, 0.73, 0.73)) == 0      # MyoPS short axis, slices along k
    assert stack_axis((0.73, 12.0, 0.73)) == 1      # the same reoriented: slices along j
    assert stack_axis((0.7, 0.7, 8.0)) == 2
    assert stack_axis((6.0, 2.0, 2.0)) is None      # make_unfamiliar.py's thick brains: ratio 3
    assert stack_axis((1.0, 1.0, 1.2)) is None
    assert plane_shape((3, 64, 80), (15.0, 1.5, 3.0), 0) == (3, 64, 159)
    assert plane_shape((64, 3, 80), (1.5, 15.0, 3.0), 1) == (3, 64, 159)


def test_only_stacks_of_2_to_32_slices_are_refined():
    assert slice_planes((6, 478, 481), (23.0, 0.73, 0.73)) == (0, (6, 234, 235))   # a MyoPS stack
    # a clinical short-axis stack, its slices along i
    assert slice_planes((478, 481, 14), (0.73, 0.73, 8.0)) == (2, (14, 234, 235))
    assert slice_planes((32, 100, 100), (10.0, 1.5, 1.5))[1] == (32, 100, 100)
    assert slice_planes((33, 100, 100), (10.0, 1.5, 1.5)) is None   # more than 32: a volume, not a stack
    assert slice_planes((1, 100, 100), (10.0, 1.5, 1.5)) is None
    assert slice_planes((6, 100, 100), (3.0, 1.5, 1.5)) is None     # not thick enough


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_layout_round_trips_and_commutes_with_warping(axis):
    torch.manual_seed(axis)
    volume, displacement = torch.rand(1, 1, 5, 6, 7), 0.1 * torch.randn(1, 3, 5, 6, 7)
    moved, moved_displacement = to_stack_layout(volume, axis), to_stack_layout(displacement, axis, True)
    assert moved.shape[2] == volume.shape[2 + axis]
    assert torch.equal(from_stack_layout(moved, axis), volume)
    assert torch.equal(from_stack_layout(moved_displacement, axis, True), displacement)
    # a displacement in the stack layout moves the permuted volume as the original moves the original
    assert torch.allclose(warp(moved, moved_displacement), to_stack_layout(warp(volume, displacement), axis), atol=1e-6)


@pytest.mark.parametrize("count, depth", [(2, 9), (3, 12), (6, 30), (5, 7)])
def test_between_slices_nearest_jumps_blended_holds_each_slice_and_blends(monkeypatch, count, depth):
    """Each network plane's correction as (lower slice, upper slice, weight of the upper): with
    blending 0 the nearest slice's (a jump of a whole slice half way); with 1 every plane less than
    one plane spacing from a slice holds that slice's alone, and in between the slice coordinate
    rises in steps of at most one plane over the blended part of the gap, never back."""
    position = np.linspace(0.0, count - 1.0, depth)
    monkeypatch.setattr(slice_refinement, "BLEND_BETWEEN_SLICES", 0.0)
    lower, upper, weight = between_slices(count, depth)
    assert lower.tolist() == np.round(position).astype(int).tolist() and float(weight.abs().max()) == 0.0
    assert torch.equal(upper, lower)
    assert np.diff(lower.numpy()).max() == 1
    monkeypatch.setattr(slice_refinement, "BLEND_BETWEEN_SLICES", 1.0)
    lower, upper, weight = between_slices(count, depth)
    assert torch.equal(upper, lower + 1)
    coordinate = lower.numpy() + weight.numpy().astype(np.float64)      # 2.4: 60 % slice 2, 40 % slice 3
    held = (count - 1.0) / (depth - 1.0)
    near = np.abs(position - np.round(position)) <= held + 1e-6
    assert np.allclose(coordinate[near], np.round(position[near]), atol=1e-5)
    steps = np.diff(coordinate)
    assert steps.min() >= -1e-6
    if held < 0.5:  # room to blend between the planes held at each slice
        assert steps.max() <= held / (1.0 - 2.0 * held) + 1e-5 < 1.0
    assert lower.min() >= 0 and lower.max() <= count - 2


def test_blending_between_slices_leaves_the_correction_at_every_slice_unchanged(monkeypatch):
    """Blending fills only the planes between slices: the correction resampled onto the fixed
    stack's own slices is the same with and without it, and between them it varies by less."""
    shifts = (3.0, -3.0, 0.0)
    fixed = torch.from_numpy(np.stack([blobs() for _ in shifts]))[None, None]
    moving = torch.from_numpy(np.stack([blobs(shift=s) for s in shifts]))[None, None]
    corrections = {}
    for blend in (0.0, 1.0):
        monkeypatch.setattr(slice_refinement, "BLEND_BETWEEN_SLICES", blend)
        corrections[blend], _ = refine_slices(torch.zeros(1, 3, 12, 40, 40), fixed, moving, (3, 64, 64), 0)
    on_slices = {blend: resize(c, (3, 40, 40)) for blend, c in corrections.items()}
    assert torch.allclose(on_slices[0.0], on_slices[1.0], atol=1e-6)
    assert float(on_slices[0.0][:, 0, :, 10:30, 10:30].abs().max()) > 0.05   # the slices were corrected
    jumps = {blend: float(c[:, :2].diff(dim=2).abs().max()) for blend, c in corrections.items()}
    assert jumps[1.0] < 0.5 * jumps[0.0]


@pytest.mark.parametrize("axis, planes", [(0, (4, 20, 31)), (1, (4, 20, 31)), (2, (4, 20, 31)), (2, (2, 9, 8))])
def test_the_fold_terms_determinant_is_that_of_the_map_in_any_layout(monkeypatch, axis, planes):
    """A linear network field x -> x + A x (normalised, stack layout) has det J = det(I + A) everywhere,
    in any units: the fold term finds exactly that for every slice axis, odd and even plane sizes and
    two slices (its scaling to voxels with FOLD_STRIDE, channels x, y, z against W, H, D)."""
    found = []
    original = jacobian.grid_determinant
    monkeypatch.setattr(jacobian, "grid_determinant", lambda *a, **k: found.append(original(*a, **k)) or found[-1])
    monkeypatch.setattr(slice_refinement, "FOLD_WEIGHT", 10.0)
    matrix = torch.tensor([[-0.5, 0.3, 0.2], [0.1, -0.2, -0.3], [0.05, 0.1, 0.4]])
    linear = torch.einsum("ij,khwj->ikhw", matrix, identity_grid(planes)[0])[None]
    order = [axis] + [n for n in range(3) if n != axis]
    image = torch.rand(1, 1, *[planes[order.index(n)] for n in range(3)])
    refine_slices(from_stack_layout(linear, axis, displacement=True), image, image, planes, axis, steps=0)
    assert found, "the fold term did not run"
    assert torch.allclose(found[-1], torch.det(torch.eye(3) + matrix).expand_as(found[-1]), atol=1e-5)


def test_the_steps_are_the_constant_as_it_is_at_the_call(monkeypatch):
    """``STEPS`` changed after import (as ``cardiac_diagnostics.py engine-settings --set STEPS=N`` does) changes
    the steps run; an explicit ``steps`` overrides it. (Until 2026-12-05 the default was bound when the module
    was read, so changing the constant changed nothing.)"""
    fixed = torch.from_numpy(np.stack([blobs(size=16) for _ in range(3)]))[None, None]
    calls = []
    monkeypatch.setattr(slice_refinement, "STEPS", 3)
    _, report = refine_slices(torch.zeros(1, 3, 6, 10, 10), fixed, fixed, (3, 16, 16), 0, progress=calls.append)
    assert report["slice_refinement"]["steps"] == 3 and len(calls) == 3
    _, report = refine_slices(torch.zeros(1, 3, 6, 10, 10), fixed, fixed, (3, 16, 16), 0, steps=5)
    assert report["slice_refinement"]["steps"] == 5


def ripples(size=64, shift=0.0):
    """(size, size) pattern of ripples moved by ``shift`` voxels along i (the last axis)."""
    j, i = np.meshgrid(np.arange(size), np.arange(size) - shift, indexing="ij")
    return (np.sin(i / 4.0) * np.cos(j / 5.0) + 0.5 * np.sin((i + j) / 7.0)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 2])
def test_the_fold_term_keeps_opposite_slice_shifts_from_folding_across_the_slices(monkeypatch, axis):
    """Fixed slices shifted +-5 voxels in turn, the moving ones not: the corrections alternate, a shear
    across the slices which, with the network's through-slice displacement varying in plane (0.6 of
    a slice gap), folds the refined map (secants across one slice gap, as the fold removal reads it).
    The fold term (as bundled) keeps it from folding."""
    count, height, width, depth = 4, 40, 56, 13                     # 4 network planes per slice gap
    fixed = torch.from_numpy(np.stack([ripples(shift=5.0 if k % 2 else -5.0)[:height, :width] for k in range(count)]))
    moving = torch.from_numpy(np.stack([ripples()[:height, :width]] * count))
    network = torch.zeros(1, 3, depth, 20, 28)
    network[0, 2] = 0.6 * 4 * torch.sin(2 * math.pi * torch.arange(28.0) / 14.0).view(1, 1, 28)
    forward = voxels_to_normalised(network)
    least, folded = {}, {}
    bundled = slice_refinement.FOLD_WEIGHT
    for weight in (0.0, bundled):
        monkeypatch.setattr(slice_refinement, "FOLD_WEIGHT", weight)
        correction, _ = refine_slices(from_stack_layout(forward, axis, True), from_stack_layout(fixed[None, None], axis),
                                      from_stack_layout(moving[None, None], axis), (count, height, width), axis)
        refined = compose(forward, to_stack_layout(correction, axis, True))
        determinant = grid_determinant(normalised_to_voxels(refined), "corners", strides=(4, 1, 1))
        least[weight], folded[weight] = float(determinant.min()), int((determinant <= 0).sum())
    assert folded[0.0] > 1000 and least[0.0] < -0.3                  # folds without the term
    assert folded[bundled] == 0 and least[bundled] > 0.1


def blobs(size=64, shift=0.0):
    """(size, size) smooth pattern moved by ``shift`` voxels along i (the last axis)."""
    j, i = np.meshgrid(np.arange(size), np.arange(size) - shift, indexing="ij")
    return (np.exp(-((i - 24.0) ** 2 + (j - 30.0) ** 2) / 60.0) + 0.7 * np.exp(-((i - 42.0) ** 2 + (j - 20.0) ** 2) / 40.0)
            + 0.5 * np.exp(-((i - 36.0) ** 2 + (j - 44.0) ** 2) / 80.0)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_slice_gets_its_own_in_plane_shift(axis):
    """Three 15 mm slices whose moving images are moved +3, -3 and 0 voxels along i: with a zero
    network field, the corrections found are about those shifts, slice by slice, and none across."""
    shifts = (3.0, -3.0, 0.0)
    fixed = torch.from_numpy(np.stack([blobs() for _ in shifts]))[None, None]
    moving = torch.from_numpy(np.stack([blobs(shift=s) for s in shifts]))[None, None]
    network_grid = (12, 40, 40)
    # the same stack stored with its slices along j or i: axes k and j (or k and i) swapped
    swap = {0: (0, 1, 2, 3, 4), 1: (0, 1, 3, 2, 4), 2: (0, 1, 4, 3, 2)}[axis]
    fixed, moving = fixed.permute(*swap), moving.permute(*swap)
    network_grid = tuple(network_grid[n - 2] for n in swap[2:])
    spacing = [1.5, 1.5, 1.5]
    spacing[axis] = 15.0
    planes = plane_shape(fixed.shape[2:], spacing, axis)
    assert planes == (3, 64, 64)
    correction, report = refine_slices(torch.zeros((1, 3) + network_grid), fixed, moving, planes, axis)
    assert report["slice_refinement"]["loss_after"] < report["slice_refinement"]["loss_before"] - 0.02
    # back to the slices-along-k storage, the displacement's channels (x, y, z) swapped to match
    correction = correction.permute(*swap)[:, {0: [0, 1, 2], 1: [0, 2, 1], 2: [2, 1, 0]}[axis]]
    voxels = normalised_to_voxels(correction)[0]   # network voxels, channels x, y, z
    assert float(voxels[2].abs().max()) == 0.0      # nothing across the slices
    along_i = voxels[0] * (63.0 / 39.0)            # network voxels (40 over the extent) to the stack's (64)
    for plane, shift in zip((0, 6, 11), shifts):   # the network planes nearest slices 0, 1 and 2
        found = float(along_i[plane, 10:30, 10:30].median())
        assert abs(found - shift) < 1.0, (plane, shift, found)
        assert float(voxels[1][plane, 10:30, 10:30].abs().median()) < 0.5


def test_a_stack_is_refined_by_default_and_not_when_off(tmp_path):
    """The cardiac-like phantom of test_thin_stacks with its moving slices moved +3, -3 and 0 mm
    along x: the network alone already aligns it to about 1 of 250 grey levels (mean absolute
    difference 0.38 / 1.19 / 1.16 per slice), so the refinement (the default) runs, lowers its loss
    and folds nothing, and must not undo that: measured 1.16 / 1.67 / 1.47 with window 9 and weight
    1000, 1.09 / 1.78 / 1.30 with 17 and 300 (it follows local NCC, which is blind in the phantom's
    flat regions), 0.30 / 1.12 / 0.73 with 41 and 300 (a window that spans the phantom's edges),
    blended between slices or not. What it gains on real stacks is measured on cardiac selection
    pairs (docs/training-log.md, "Session of 2026-12-04")."""
    from fmsam.cli import main
    from test_thin_stacks import phantom

    fixed = phantom()
    slices = [sitk.GetArrayFromImage(phantom(shift_mm=(shift, 0.0)))[k] for k, shift in enumerate((3.0, -3.0, 0.0))]
    moving = sitk.GetImageFromArray(np.stack(slices))
    moving.CopyInformation(fixed)
    paths = [str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz")]
    sitk.WriteImage(fixed, paths[0])
    sitk.WriteImage(moving, paths[1])
    reports, errors = {}, {}
    for setting, flags in (("default", []), ("off", ["--slice-refinement", "off"])):
        out = str(tmp_path / setting)
        assert main(["register", *paths, "--out", out, "--quiet"] + flags) == 0
        reports[setting] = json.load(open(os.path.join(out, "report.json")))
        warped = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "warped.nii.gz"), sitk.sitkFloat32))
        errors[setting] = np.abs(warped - sitk.GetArrayFromImage(fixed)).mean(axis=(1, 2))
    assert reports["off"]["slice_refinement"] == {"applied": False}
    refined = reports["default"]["slice_refinement"]
    assert refined["applied"] and refined["planes"][0] == 3
    assert refined["loss_after"] < refined["loss_before"]
    assert reports["default"]["folding_percent"] == 0.0
    unregistered = np.abs(sitk.GetArrayFromImage(moving) - sitk.GetArrayFromImage(fixed)).mean(axis=(1, 2))
    assert np.all(errors["off"][:2] < 0.3 * unregistered[:2]), errors
    assert np.all(errors["default"] < errors["off"] + 1.0), errors


def test_progress_is_called_during_the_refinement_and_can_stop_it():
    """Each refinement step calls ``progress`` (within the 'network' stage in fast mode), so a
    console run can be cancelled during it, as during instance optimisation."""
    import fmsam
    from fmsam.slice_refinement import STEPS
    from test_thin_stacks import phantom

    fixed, moving = phantom(), phantom(shift_mm=(3.0, -2.0))
    calls = []
    result = fmsam.register(fixed, moving, device="cpu",
                            progress=lambda stage, fraction: calls.append((stage, fraction)))
    assert result.report["slice_refinement"]["applied"]
    network = [fraction for stage, fraction in calls if stage == "network"]
    assert len(network) >= STEPS and network == sorted(network) and network[-1] == 1.0

    def stop_half_way(stage, fraction):
        if stage == "network" and 0.5 <= fraction < 1.0:
            raise fmsam.Cancelled()

    with pytest.raises(fmsam.Cancelled):
        fmsam.register(fixed, moving, device="cpu", progress=stop_half_way)


def test_accurate_mode_on_a_stack_refines_the_slices_instead_of_the_volume():
    """On a stack the refinement replaces accurate mode's 3-D instance optimisation
    (:data:`fmsam.slice_refinement.INSTANCE_OPTIMISATION_ON_STACKS`): the report says 0 steps ran of
    the 2 asked for, and the result is fast mode's fields refined, with accurate mode's two-way
    affine. With the refinement off, or on a volume, the steps run."""
    import fmsam
    from test_thin_stacks import phantom

    fixed, moving = phantom(), phantom(shift_mm=(3.0, -2.0))
    stack = fmsam.register(fixed, moving, device="cpu", io_steps=2)
    assert stack.report["io_steps"] == 2 and stack.report["io_steps_run"] == 0
    assert stack.report["slice_refinement"]["applied"] and "io_loss_before" not in stack.report
    assert "network_passes" in stack.report  # fast mode's fields (accurate_fields does not write it)
    assert "instance_optimisation" not in stack.report["seconds"]
    assert stack.report["affine_both_ways"]
    off = fmsam.register(fixed, moving, device="cpu", io_steps=2, slice_refinement="off")
    assert off.report["io_steps_run"] == 2 and "io_loss_after" in off.report
    fast = fmsam.register(fixed, moving, device="cpu")
    assert fast.report["io_steps_run"] == 0 and fast.report["slice_refinement"]["applied"]
    assert not fast.report["affine_both_ways"]  # so the check above tells the modes apart


def shifted_phantom_files(folder):
    """The stack phantom and a copy moved (3, -2) mm in plane, written as NIfTI: ``[fixed, moving]``."""
    from test_thin_stacks import phantom

    paths = [str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz")]
    sitk.WriteImage(phantom(), paths[0])
    sitk.WriteImage(phantom(shift_mm=(3.0, -2.0)), paths[1])
    return paths


def test_the_command_line_says_when_the_refinement_replaced_instance_optimisation(tmp_path, capsys):
    from fmsam.cli import main

    paths = shifted_phantom_files(tmp_path)
    assert main(["register", *paths, "--out", str(tmp_path / "accurate"), "--quiet", "--mode", "accurate"]) == 0
    assert "; slices refined in place of instance optimisation; outputs in" in capsys.readouterr().out
    assert main(["register", *paths, "--out", str(tmp_path / "fast"), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "; slices refined; outputs in" in line and "in place of" not in line


def test_whether_instance_optimisation_runs_is_known_without_loading_torch():
    """The Slicer module's main process asks (for its progress bar) before any engine runs: a fresh
    interpreter answers from the image's geometry with PyTorch left unloaded."""
    import subprocess
    import sys

    code = (
        "import sys, SimpleITK as sitk\n"
        "from fmsam.slice_refinement import instance_optimisation_steps, planes_to_refine\n"
        "stack = sitk.Image([96, 96, 3], sitk.sitkFloat32); stack.SetSpacing([1.5, 1.5, 15.0])\n"
        "volume = sitk.Image([64, 64, 64], sitk.sitkFloat32)\n"
        "print(planes_to_refine(stack, 'auto'), planes_to_refine(stack, 'off'), planes_to_refine(volume, 'auto'),\n"
        "      instance_optimisation_steps(18, planes_to_refine(stack, 'auto')),\n"
        "      instance_optimisation_steps(18, planes_to_refine(stack, 'off')),\n"
        "      instance_optimisation_steps(18, planes_to_refine(volume, 'auto')), 'torch' in sys.modules, sep='|')\n")
    answer = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True,
                            universal_newlines=True).stdout.strip().split("|")
    assert answer == ["(0, (3, 96, 96))", "None", "None", "0", "18", "18", "False"]


def test_evaluate_takes_the_option_and_says_what_ran(tmp_path):
    """``fmsam evaluate --slice-refinement`` reaches the engine, and each row says whether the slices
    were refined and how many instance-optimisation steps ran (accurate mode: none on the stack
    with the refinement, one, as asked, without it)."""
    import csv

    from fmsam.cli import main

    paths = shifted_phantom_files(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fixed,moving\n%s,%s\n" % tuple(paths))
    rows = {}
    for setting in ("auto", "off"):
        results = tmp_path / ("results_%s.csv" % setting)
        assert main(["evaluate", "--pairs", str(pairs), "--out", str(results), "--device", "cpu",
                     "--io-steps", "1", "--slice-refinement", setting]) == 0
        rows[setting] = list(csv.DictReader(open(results, newline="")))
    assert [(r["slices_refined"], r["io_steps_run"]) for r in rows["auto"]] == [("True", "0")]
    assert [(r["slices_refined"], r["io_steps_run"]) for r in rows["off"]] == [("False", "1")]
