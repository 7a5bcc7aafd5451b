"""The module's grid transforms stay linear when Slicer reads them back from a scene.

The module builds its displacement grids with linear interpolation, as ITK and the engine read them
(the warped volume and the Jacobian map are computed that way). Slicer's reader of transform files
gives every displacement grid it reads cubic interpolation (the file has no setting for it), so a
scene saved and opened again mapped points differently from the run that made it: 0.17-0.20 mm at
most on the sample pair with ``fmsam_adam_v9b`` (300 points inside the fixed image; the grid's
nodes about 2.4 mm apart), and within the file's float32 once the grids are linear again.

Every transform node the module fills carries ``mrml_io.GRID_INTERPOLATION_ATTRIBUTE`` (saved with
the scene); the module's startup calls :func:`keep_linear_on_load` on Slicer's scene, which sets
linear interpolation on those nodes' grids each time a scene is read into it. Only there: a
transform file loaded on its own (without the scene's attributes), a scene opened in a Slicer
without the extension, and a node's data reloaded by itself keep Slicer's cubic reading.
"""
import logging

import slicer
import vtk

from .mrml_io import GRID_INTERPOLATION_ATTRIBUTE as ATTRIBUTE
from .mrml_io import LINEAR_GRID_INTERPOLATION as LINEAR
from .mrml_io import nodes_of_class


def grid_parts(transform):
    """The displacement grids (``vtkGridTransform``, ``vtkOrientedGridTransform``) of a VTK
    transform, looking inside ``vtkGeneralTransform`` concatenations and their inputs. Each
    transform is updated first: an inverse (a node's other direction) takes its parts and their
    settings from the transform it inverts only then."""
    if transform is None or not transform.IsA("vtkAbstractTransform"):
        return []
    transform.Update()
    if transform.IsA("vtkGridTransform"):
        return [transform]
    if not transform.IsA("vtkGeneralTransform"):
        return []
    parts = [transform.GetConcatenatedTransform(n) for n in range(transform.GetNumberOfConcatenatedTransforms())]
    return [grid for part in parts + [transform.GetInput()] for grid in grid_parts(part)]


def restore_linear(transform_node):
    """Linear interpolation on every grid of ``transform_node``, whichever direction it stores
    (the grids it holds are in its FromParent, as the module stores them, or in its ToParent; the
    other direction's are copies that follow them at their update, so the stored one goes first);
    True when something changed, and then the node says its transform was modified."""
    changed = False
    for direction in (transform_node.GetTransformFromParent, transform_node.GetTransformToParent):
        for grid in grid_parts(direction()):
            if grid.GetInterpolationMode() != vtk.VTK_LINEAR_INTERPOLATION:
                grid.SetInterpolationModeToLinear()
                changed = True
    if changed:
        transform_node.InvokeCustomModifiedEvent(slicer.vtkMRMLTransformableNode.TransformModifiedEvent)
    return changed


def restore_linear_in_scene(scene):
    """:func:`restore_linear` on every transform node of ``scene`` that the module marked;
    returns how many nodes changed."""
    return sum(restore_linear(node) for node in nodes_of_class(scene, "vtkMRMLTransformNode")
               if node.GetAttribute(ATTRIBUTE) == LINEAR)


def keep_linear_on_load(scene):
    """Observe ``scene`` (Slicer's ``slicer.mrmlScene``) so that each scene read into it, once its
    data are loaded (``EndImportEvent``: File > Load Scene, an ``.mrb`` dropped or added, Slicer
    started with a scene file), gets the marked nodes' grids linear again; returns the observer's
    tag (``scene.RemoveObserver(tag)`` ends it)."""

    def restore(caller, _event):
        try:
            restore_linear_in_scene(caller)
        except Exception:  # an observer's exception would only be printed by VTK
            logging.exception("FM-SAM Registration: could not make the scene's grid transforms linear again")

    return scene.AddObserver(scene.EndImportEvent, restore)
