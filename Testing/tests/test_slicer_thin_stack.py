"""The module's logic on Slicer's real MRML (slicer-core) with a thin, anisotropic stack (issue 14):
a synthetic 3-slice short-axis-like stack, slices 15 mm thick and 1 mm in plane, oblique, registered
in-process (``RegistrationLogic.register``, CPU) as a console call in Slicer does it.
"""
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

import vtk  # noqa: E402  (slicer-core's VTK)

from FMSAMRegistrationLib import RegistrationLogic, mrml_io  # noqa: E402
from FMSAMRegistrationLib.scene import new_scene  # noqa: E402
from fmsam.options import DEFAULT_SLICE_REFINEMENT  # noqa: E402
from test_thin_stacks import MAX_FOLDING_PERCENT, phantom  # noqa: E402

#: An oblique short-axis orientation (LPS direction columns), as cardiac stacks are stored.
OBLIQUE = sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()


def thin_stack(shift_mm=(0.0, 0.0)):
    image = phantom(shift_mm=shift_mm, slices=3, size=96, spacing=(1.0, 1.0, 15.0))
    image.SetDirection(OBLIQUE)
    return sitk.Cast(image, sitk.sitkUInt8)


def ijk_to_ras(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thin_scene")
    paths = {"fixed": str(folder / "fixed.nii.gz"), "moving": str(folder / "moving.nii.gz")}
    sitk.WriteImage(thin_stack(), paths["fixed"])
    sitk.WriteImage(thin_stack(shift_mm=(4.0, -3.0)), paths["moving"])
    headless = new_scene()
    fixed, moving = headless.load_volume(paths["fixed"], "fixed"), headless.load_volume(paths["moving"], "moving")
    logic = RegistrationLogic(headless.scene, headless.color_logic)
    outcome = logic.register(fixed, moving, device="cpu")
    return {"fixed": fixed, "moving": moving, "outcome": outcome, "paths": paths}


def test_the_stack_is_thin_and_oblique_in_the_scene(thin_run):
    fixed = thin_run["fixed"]
    assert slicer.util.arrayFromVolume(fixed).shape == (3, 96, 96)
    assert np.allclose(fixed.GetSpacing(), (1.0, 1.0, 15.0))
    assert not np.allclose(np.abs(ijk_to_ras(fixed)[:3, :3]), np.diag([1.0, 1.0, 15.0]))


def test_outputs_exist_on_the_fixed_grid(thin_run):
    fixed, outcome = thin_run["fixed"], thin_run["outcome"]
    expected = ijk_to_ras(fixed)  # spacing, origin and directions in RAS
    shape = slicer.util.arrayFromVolume(fixed).shape
    for node in (outcome.warpedVolumeNode, outcome.jacobianVolumeNode):
        assert node is not None and node.GetScene() is fixed.GetScene()
        assert np.allclose(ijk_to_ras(node), expected, atol=1e-6), node.GetName()
        assert slicer.util.arrayFromVolume(node).shape == shape
    transform = outcome.transformNode
    assert transform is not None and transform.IsA("vtkMRMLGridTransformNode")
    # One transform: the displacement grid on the network grid over the stack, then the affine.
    composite = transform.GetTransformFromParent()
    assert composite.GetNumberOfConcatenatedTransforms() == 2
    grid = composite.GetConcatenatedTransform(0)
    assert grid.IsA("vtkOrientedGridTransform")
    data = grid.GetDisplacementGrid()
    direction = slicer.util.arrayFromVTKMatrix(grid.GetGridDirectionMatrix())[:3, :3]
    grid_to_ras = np.eye(4)
    grid_to_ras[:3, :3] = direction @ np.diag(data.GetSpacing())
    grid_to_ras[:3, 3] = data.GetOrigin()

    def box(ijk_to_ras_matrix, first, last):  # RAS bounding box of the index box [first, last]^3
        found = [ijk_to_ras_matrix[:3, :3] @ np.where(np.array(c) == 0, first, last) + ijk_to_ras_matrix[:3, 3]
                 for c in np.ndindex(2, 2, 2)]
        return np.min(found, axis=0), np.max(found, axis=0)

    # The network grid (in the training layout, extended by edge copies) covers the stack's voxels,
    # half a voxel beyond its first and last voxel centres (the outer half slices included).
    grid_low, grid_high = box(grid_to_ras, np.zeros(3), np.array(data.GetDimensions()) - 1.0)
    stack_low, stack_high = box(expected, np.full(3, -0.5), np.array(shape[::-1]) - 0.5)
    assert np.all(grid_low <= stack_low + 1e-3) and np.all(grid_high >= stack_high - 1e-3)


def test_values_are_finite_the_jacobian_positive_and_the_stack_aligned(thin_run):
    outcome = thin_run["outcome"]
    fixed_image = sitk.ReadImage(thin_run["paths"]["fixed"])
    centres = np.array([fixed_image.TransformIndexToPhysicalPoint((i, j, k)) for k in range(3)
                        for j in range(0, 96, 3) for i in range(0, 96, 3)])
    field = mrml_io.map_points_from_parent(outcome.transformNode, centres) - centres
    warped = slicer.util.arrayFromVolume(outcome.warpedVolumeNode).astype(np.float64)
    jacobian = slicer.util.arrayFromVolume(outcome.jacobianVolumeNode)
    for values in (field, warped, jacobian):
        assert np.all(np.isfinite(values))
    assert np.mean(jacobian > 0) > 0.9995  # positive almost everywhere
    assert outcome.foldingPercent < MAX_FOLDING_PERCENT
    fixed = slicer.util.arrayFromVolume(thin_run["fixed"]).astype(np.float64)
    unregistered = sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(thin_run["paths"]["moving"], sitk.sitkFloat64),
        sitk.ReadImage(thin_run["paths"]["fixed"], sitk.sitkFloat64)))
    assert np.abs(warped - fixed).mean() < 0.5 * np.abs(unregistered - fixed).mean()


def test_slice_refinement_by_default_and_off_through_the_engine_process(thin_run):
    """The in-process run above used the default: the stack's 3 slices refined, and the results
    line says so. The Register button's path (an engine process and its request file) with
    ``sliceRefinement='off'`` carries that to the engine: nothing refined, nothing said."""
    assert DEFAULT_SLICE_REFINEMENT == "auto"
    refined = thin_run["outcome"].report["slice_refinement"]
    assert refined["applied"] and refined["planes"][0] == 3
    assert refined["loss_after"] < refined["loss_before"]
    assert "Slices refined" in thin_run["outcome"].summary()
    headless = new_scene()
    fixed = headless.load_volume(thin_run["paths"]["fixed"], "fixed")
    moving = headless.load_volume(thin_run["paths"]["moving"], "moving")
    job = RegistrationLogic(headless.scene, headless.color_logic).start(fixed, moving, device="cpu",
                                                                        sliceRefinement="off")
    while job.running:
        time.sleep(0.2)
    outcome = job.finish()
    assert outcome.report["slice_refinement"] == {"applied": False}
    assert "Slices refined" not in outcome.summary()
    assert outcome.foldingPercent < MAX_FOLDING_PERCENT


def test_the_results_line_says_when_the_refinement_replaced_instance_optimisation(thin_run):
    """Accurate mode on a stack runs the slice refinement in place of its instance optimisation
    (the engine's report: ``io_steps`` asked, ``io_steps_run`` 0); the results line says so, and
    only then."""
    from FMSAMRegistrationLib.logic import RegistrationOutcome

    replaced = " (in place of instance optimisation)."
    assert replaced not in thin_run["outcome"].summary()  # fast mode: nothing was replaced
    report = dict(thin_run["outcome"].report, io_steps=18, io_steps_run=0)
    assert "Slices refined: each fixed slice got its own in-plane correction" + replaced in \
        RegistrationOutcome(None, None, None, report).summary()
    report.update(io_steps_run=18)
    assert replaced not in RegistrationOutcome(None, None, None, report).summary()


def test_the_progress_bar_of_accurate_mode_on_a_stack_has_no_instance_optimisation_share(thin_run):
    """The overall progress bar gives instance optimisation half the weight of the other stages in
    accurate mode; on a stack the refinement replaces it (the stage never begins), so the bar must
    not count it, or it would stall at the end of 'network' and then jump. Known in the main process
    from the fixed volume's geometry alone; with the refinement off the steps run and count."""
    from FMSAMRegistrationLib.jobs import RegistrationJob

    logic = RegistrationLogic(thin_run["fixed"].GetScene())
    fractions = {}
    for refinement in ("auto", "off"):
        request = logic.prepare(thin_run["fixed"], thin_run["moving"], mode="accurate", sliceRefinement=refinement)
        job = RegistrationJob(logic, request)
        job._set_progress("network", 1.0)
        fractions[refinement] = job.fraction
    assert fractions["auto"] == pytest.approx(0.05 + 0.45 + 0.2)
    assert fractions["off"] == pytest.approx((0.05 + 0.45 + 0.2) / 1.5)
