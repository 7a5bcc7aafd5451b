"""The module's grid transforms stay linear when Slicer reads them back from a scene.

The module builds its displacement grids with linear interpolation, as ITK and the engine read them
(the warped volume and the Jacobian map are computed that way). Slicer's reader of transform files
gives every displacement grid it reads cubic interpolation (the file has no setting for it), so a
scene saved and opened again mapped points differently from the run that made it: up to 0.26 mm
on the sample pair with ``fmsam_adam_v9b`` (2000 points inside the fixed image; the grid's nodes
about 2.4 mm apart), and 3e-5 mm (the file's float32) once the grids are linear again.

Every grid transform node the module makes carries :data:`ATTRIBUTE` (saved with the scene); the
module's startup calls :func:`keep_linear_on_load` on Slicer's scene, which sets linear
interpolation on those nodes' grids each time a scene is read. A transform file loaded on its own
(without the scene's attributes) keeps Slicer's cubic reading.
"""
import vtk

ATTRIBUTE = "FMSAMRegistration.GridInterpolation"
LINEAR = "linear"


def mark_linear(transform_node):
    """Record on ``transform_node`` (saved with the scene) that its grids interpolate linearly."""
    transform_node.SetAttribute(ATTRIBUTE, LINEAR)
    return transform_node


def grid_parts(transform):
    """The displacement grids (``vtkGridTransform``, ``vtkOrientedGridTransform``) of a VTK
    transform, looking inside ``vtkGeneralTransform`` concatenations and their inputs (the grids
    of an inverse are copies that follow the grids they invert at each update)."""
    if transform is None:
        return []
    if transform.IsA("vtkGridTransform"):
        return [transform]
    if not transform.IsA("vtkGeneralTransform"):
        return []
    transform.Update()  # an inverse (a node's ToParent) lists its parts once updated
    parts = [transform.GetConcatenatedTransform(n) for n in range(transform.GetNumberOfConcatenatedTransforms())]
    return [grid for part in parts + [transform.GetInput()] for grid in grid_parts(part)]


def restore_linear(transform_node):
    """Linear interpolation on every grid of ``transform_node``'s FromParent transform (its
    ToParent is the inverse of the same grids); returns how many grids were changed."""
    changed = 0
    for grid in grid_parts(transform_node.GetTransformFromParent()):
        if grid.GetInterpolationMode() != vtk.VTK_LINEAR_INTERPOLATION:
            grid.SetInterpolationModeToLinear()
            changed += 1
    return changed


def restore_linear_in_scene(scene):
    """:func:`restore_linear` on every transform node of ``scene`` marked by :func:`mark_linear`;
    returns how many grids were changed."""
    return sum(restore_linear(node) for node in scene.GetNodesByClass("vtkMRMLTransformNode")
               if node.GetAttribute(ATTRIBUTE) == LINEAR)


def keep_linear_on_load(scene):
    """Observe ``scene`` (Slicer's ``slicer.mrmlScene``) so that each scene read into it, once its
    data are loaded (``EndImportEvent``), gets the marked nodes' grids linear again; returns the
    observer's tag (``scene.RemoveObserver(tag)`` ends it)."""
    return scene.AddObserver(scene.EndImportEvent, lambda caller, event: restore_linear_in_scene(caller))
