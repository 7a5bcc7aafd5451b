"""The module's grid transforms read back from a saved scene map points as the run that made them.

Slicer's own reader of transform files (slicer-core's real MRML) gives every displacement grid it
reads cubic interpolation; the module's grids are linear (as ITK and the engine read them).
``FMSAMRegistrationLib.grid_interpolation`` marks the module's nodes and makes their grids linear
again when a scene is read.
"""
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

from fmsam.fields import Deformation, network_grid  # noqa: E402
from FMSAMRegistrationLib import grid_interpolation, mrml_io  # noqa: E402
from FMSAMRegistrationLib.scene import new_scene  # noqa: E402


def curved_field(grid):
    """(k, j, i, 3) LPS mm: a displacement that bends between the grid's nodes (a few mm)."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid.GetSize()[::-1]], indexing="ij")
    field = np.zeros(k.shape + (3,), np.float32)
    field[..., 0] = 3.0 * np.sin(0.9 * j) * np.cos(0.7 * k)
    field[..., 1] = 2.0 * np.cos(1.1 * i)
    field[..., 2] = 2.5 * np.sin(0.8 * i + 0.6 * j)
    return field


@pytest.fixture
def saved_scene(tmp_path):
    """A scene bundle with the module's registration node and an unmarked copy of its grid; the
    points and where the module's node maps them (LPS)."""
    fixed = sitk.Image([40, 36, 30], sitk.sitkFloat32)
    fixed.SetSpacing((1.5, 1.2, 2.0))
    fixed.SetOrigin((-20.0, 15.0, 7.0))
    fixed.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    grid = network_grid(fixed, (12, 14, 16))
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((2.0, -1.0, 3.0))
    headless = new_scene()
    made = headless.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "made by the module")
    mrml_io.set_registration_transform(made, affine, Deformation(grid, curved_field(grid)))
    other = headless.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "someone else's")
    mrml_io.set_registration_transform(other, affine, Deformation(grid, curved_field(grid)))
    other.RemoveAttribute(grid_interpolation.ATTRIBUTE)
    # a marked node holding its grid as ToParent (as after the Transforms module's Invert)
    inverted = headless.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "stored to parent")
    inverted.SetAndObserveTransformToParent(mrml_io._oriented_grid_transform(curved_field(grid), grid))
    inverted.SetAttribute(grid_interpolation.ATTRIBUTE, "linear")
    rng = np.random.default_rng(5)
    size = np.array(fixed.GetSize(), np.float64)
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(rng.uniform(2.0, size - 3.0).tolist())
                       for _ in range(400)])
    expected = mrml_io.map_points_from_parent(made, points)
    inverse_points = points[:40]  # VTK inverts that grid point by point (iteratively)
    expected_inverted = mrml_io.map_points_from_parent(inverted, inverse_points)
    path = headless.write_bundle(str(tmp_path / "scene.mrb"))
    return {"path": path, "points": points, "expected": expected, "inverse_points": inverse_points,
            "expected_inverted": expected_inverted}


def interpolation_modes(node):
    return [grid.GetInterpolationModeAsString() for grid in grid_interpolation.grid_parts(node.GetTransformFromParent())]


def test_the_module_marks_its_grids_linear(saved_scene):
    headless = new_scene()
    headless.read_bundle(saved_scene["path"])
    made = headless.scene.GetFirstNodeByName("made by the module")
    assert made.GetAttribute(grid_interpolation.ATTRIBUTE) == "linear"  # saved with the scene
    assert headless.scene.GetFirstNodeByName("someone else's").GetAttribute(grid_interpolation.ATTRIBUTE) is None


def test_slicer_reads_grids_cubic_and_the_module_makes_its_own_linear_again(saved_scene):
    points, expected = saved_scene["points"], saved_scene["expected"]
    plain = new_scene()  # Slicer's reader alone
    plain.read_bundle(saved_scene["path"])
    made = plain.scene.GetFirstNodeByName("made by the module")
    assert interpolation_modes(made) == ["Cubic"]
    cubic_apart = np.abs(mrml_io.map_points_from_parent(made, points) - expected).max()
    assert cubic_apart > 0.02, cubic_apart  # what the module has to undo (this field: about 0.1 mm)

    observed = new_scene()  # as in Slicer with the module loaded (its startup observes the scene)
    tag = grid_interpolation.keep_linear_on_load(observed.scene)
    observed.read_bundle(saved_scene["path"])
    made = observed.scene.GetFirstNodeByName("made by the module")
    assert interpolation_modes(made) == ["Linear"]
    assert np.abs(mrml_io.map_points_from_parent(made, points) - expected).max() < 1e-3  # float32 file
    assert np.abs(expected - points).max() > 2.0  # the transform moves points
    assert interpolation_modes(observed.scene.GetFirstNodeByName("someone else's")) == ["Cubic"]  # left alone
    inverted = observed.scene.GetFirstNodeByName("stored to parent")
    assert [grid.GetInterpolationModeAsString() for grid in grid_interpolation.grid_parts(
        inverted.GetTransformToParent())] == ["Linear"]
    assert np.abs(mrml_io.map_points_from_parent(inverted, saved_scene["inverse_points"])
                  - saved_scene["expected_inverted"]).max() < 1e-3

    observed.scene.Clear(0)  # File > Close Scene, then the scene read again: still observed
    observed.read_bundle(saved_scene["path"])
    assert interpolation_modes(observed.scene.GetFirstNodeByName("made by the module")) == ["Linear"]
    observed.scene.RemoveObserver(tag)
    observed.scene.Clear(0)
    observed.read_bundle(saved_scene["path"])
    assert interpolation_modes(observed.scene.GetFirstNodeByName("made by the module")) == ["Cubic"]


def test_restoring_counts_nodes_says_so_and_keeps_no_node_alive(saved_scene):
    headless = new_scene()
    headless.read_bundle(saved_scene["path"])
    made = headless.scene.GetFirstNodeByName("made by the module")
    references = [node.GetReferenceCount() for node in mrml_io.nodes_of_class(headless.scene, "vtkMRMLTransformNode")]
    modified = []
    made.AddObserver(slicer.vtkMRMLTransformableNode.TransformModifiedEvent, lambda caller, event: modified.append(1))
    assert grid_interpolation.restore_linear_in_scene(headless.scene) == 2  # the two marked nodes
    assert modified and grid_interpolation.restore_linear_in_scene(headless.scene) == 0
    assert [node.GetReferenceCount() for node in mrml_io.nodes_of_class(headless.scene, "vtkMRMLTransformNode")] \
        == references  # the scene's collections were released
    inverse_parts = grid_interpolation.grid_parts(headless.scene.GetFirstNodeByName("made by the module")
                                                  .GetTransformToParent())
    assert [grid.GetInterpolationModeAsString() for grid in inverse_parts] == ["Linear"]
    assert grid_interpolation.grid_parts(None) == [] and grid_interpolation.grid_parts(slicer.vtkMRMLScene()) == []
