"""MRML nodes to and from the engine's SimpleITK images, in memory (no temporary files).

Frames: MRML volumes carry ``IJKToRAS`` (RAS millimetres) and may sit under a parent transform;
the engine works in LPS. The conversion between the two is ``fmsam.geometry``'s (the one place
that converts LPS and RAS); this module only reads and writes nodes.

A volume under a *linear* parent transform is read in world coordinates, exactly as hardening a
copy of it would give (the voxels are not resampled, only the grid is moved). A volume under a
non-linear transform is refused: hardening it would resample it, which the user should choose.
"""
import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from fmsam.errors import InputError
from fmsam.fields import affine_matrix
from fmsam.geometry import LPS_TO_RAS, flip_lps_ras, grid_from_ijk_to_ras, index_to_ras


def world_ijk_to_ras(node, what):
    """The node's IJK-to-world (RAS) matrix, through its linear parent transforms (4x4 array)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is None:
        return matrix
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            "the %s '%s' is under the non-linear transform '%s': harden it (Data module, right-click "
            "the volume > Harden transform) or move the volume out of the transform first"
            % (what, node.GetName(), parent.GetName()))
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return slicer.util.arrayFromVTKMatrix(to_world) @ matrix


def _check_has_voxels(node, what):
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError("the %s '%s' has no voxels" % (what, node.GetName()))
    return image_data


def _image_on_node_grid(voxels_kji, node, what):
    """A SimpleITK image of ``voxels_kji`` (a copy) with ``node``'s world geometry (LPS)."""
    image = sitk.GetImageFromArray(np.array(voxels_kji, copy=True))  # never the node's own memory
    image.CopyInformation(grid_from_ijk_to_ras(world_ijk_to_ras(node, what), image.GetSize()))
    return image


def image_from_volume_node(node, what="volume"):
    """A SimpleITK image (LPS, world coordinates) holding a copy of a scalar volume node's voxels."""
    if node is None:
        raise InputError("no %s was given" % what)
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError("the %s '%s' is a %s, not a scalar volume" % (what, node.GetName(), node.GetClassName()))
    image_data = _check_has_voxels(node, what)
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError("the %s '%s' has %d components per voxel; pick a single-component (scalar) "
                         "volume" % (what, node.GetName(), image_data.GetNumberOfScalarComponents()))
    return _image_on_node_grid(slicer.util.arrayFromVolume(node), node, what)


def label_image_from_node(node, reference_volume_node, what, segment_values=None, scene=None):
    """A label map (SimpleITK, uint16, LPS) on ``reference_volume_node``'s grid.

    ``node`` is a label map volume (its own grid, which must be the reference's) or a
    segmentation (exported onto the reference grid; segment ``name -> label value`` from
    ``segment_values``, so that two segmentations get matching values).
    """
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        _check_has_voxels(node, what)
        return _image_on_node_grid(slicer.util.arrayFromVolume(node).astype(np.uint16), node, what)
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("the %s '%s' is a %s; pick a segmentation or a label map volume"
                         % (what, node.GetName(), node.GetClassName()))
    return _segmentation_to_label_image(node, reference_volume_node, what, segment_values, scene)


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]


def _segmentation_to_label_image(node, reference_volume_node, what, segment_values, scene):
    """Export the segments named in ``segment_values`` to a temporary label map node (removed
    again before returning) on the reference volume's grid."""
    if node.GetParentTransformNode() is not None and not node.GetParentTransformNode().IsTransformToWorldLinear():
        raise InputError("the %s '%s' is under a non-linear transform; harden it first" % (what, node.GetName()))
    scene = scene or node.GetScene()
    segmentation = node.GetSegmentation()
    wanted = segment_values or {name: value for value, name in enumerate(segment_names(node), start=1)}
    ids, values = vtk.vtkStringArray(), []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if segment.GetName() in wanted:
            ids.InsertNextValue(segmentation.GetNthSegmentID(index))
            values.append(wanted[segment.GetName()])
    if not values:
        raise InputError("the %s '%s' has no segments to compare" % (what, node.GetName()))
    existing = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__fmsam_export")
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, temporary, reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not exported:
            raise InputError("the %s '%s' could not be exported onto the grid of '%s'"
                             % (what, node.GetName(), reference_volume_node.GetName()))
        # The export numbers segments 1..n in the order given; map them to the shared values.
        lookup = np.zeros(len(values) + 1, dtype=np.uint16)
        lookup[1:] = values
        export_values = slicer.util.arrayFromVolume(temporary).astype(np.int64)
        return _image_on_node_grid(lookup[export_values], temporary, what)
    finally:
        # The export adds a display node and a colour table besides the label map: remove them all.
        added = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
        for extra in added:
            if extra.GetID() not in existing:
                scene.RemoveNode(extra)


def shared_segment_values(fixed_node, moving_node):
    """Label values for the segments both segmentations name the same way (``name -> value``).

    ``None`` when either node is a label map volume: label maps already share their values.
    """
    if fixed_node is None or moving_node is None:
        return None
    if not (fixed_node.IsA("vtkMRMLSegmentationNode") and moving_node.IsA("vtkMRMLSegmentationNode")):
        if fixed_node.IsA("vtkMRMLSegmentationNode") or moving_node.IsA("vtkMRMLSegmentationNode"):
            raise InputError("give two segmentations or two label maps, not one of each: their label "
                             "values cannot be matched")
        return None
    moving_names = set(segment_names(moving_node))
    shared = [name for name in segment_names(fixed_node) if name in moving_names]
    if not shared:
        raise InputError("the fixed and moving segmentations have no segment names in common, so "
                         "Dice cannot be computed")
    return {name: value for value, name in enumerate(shared, start=1)}


def set_volume_from_image(node, image):
    """Fill a volume node with a SimpleITK image's voxels and geometry (world RAS, no parent)."""
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(index_to_ras(image)))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


#: Set to :data:`LINEAR_GRID_INTERPOLATION` on every transform node this module fills: its grids
#: interpolate linearly, as ITK and the engine read them, which Slicer's reader of transform files
#: does not keep (:mod:`FMSAMRegistrationLib.grid_interpolation` restores it when a scene is read).
GRID_INTERPOLATION_ATTRIBUTE = "FMSAMRegistration.GridInterpolation"
LINEAR_GRID_INTERPOLATION = "linear"


def nodes_of_class(scene, class_name):
    """The scene's nodes of ``class_name`` (subclasses too) as a list. The collection the scene
    returns is new and owned by the caller; released here, or every node in it would be kept alive
    (one reference per call), as ``slicer.util.getNodesByClass`` releases it."""
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]


def _oriented_grid_transform(field_lps, reference):
    """A ``vtkOrientedGridTransform`` (RAS, linear interpolation as ITK) of a displacement field:
    ``field_lps`` (k, j, i, 3) LPS millimetres on ``reference``'s grid (SimpleITK image)."""
    ijk_to_ras = index_to_ras(reference)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / spacing
    field_ras = np.ascontiguousarray(flip_lps_ras(field_lps).reshape(-1, 3))

    grid = vtk.vtkImageData()
    grid.SetDimensions(*reference.GetSize())
    grid.SetOrigin(*ijk_to_ras[:3, 3])
    grid.SetSpacing(*spacing)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    scalars = numpy_support.numpy_to_vtk(field_ras, deep=True, array_type=vtk.VTK_DOUBLE)
    scalars.SetName("displacement")
    grid.GetPointData().SetScalars(scalars)

    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
    transform.SetInterpolationModeToLinear()  # ITK's displacement fields interpolate linearly
    return transform


def _linear_ras(matrix_lps):
    """A ``vtkTransform`` (RAS) of a 4x4 homogeneous LPS matrix."""
    linear = vtk.vtkTransform()
    linear.SetMatrix(slicer.util.vtkMatrixFromArray(LPS_TO_RAS @ matrix_lps @ LPS_TO_RAS))
    return linear


def _set_from_parent(transform_node, *parts):
    """Store ``parts`` (VTK transforms, applied in the order given) as one ``vtkGeneralTransform``,
    the node's FromParent transform, and mark the node's grids linear
    (:data:`GRID_INTERPOLATION_ATTRIBUTE`)."""
    composite = vtk.vtkGeneralTransform()
    composite.PostMultiply()  # each transform concatenated is applied after the ones before
    for part in parts:
        composite.Concatenate(part)
    transform_node.SetAndObserveTransformFromParent(composite)
    transform_node.SetAttribute(GRID_INTERPOLATION_ATTRIBUTE, LINEAR_GRID_INTERPOLATION)  # saved with the scene
    return transform_node


def set_registration_transform(transform_node, affine, deformation):
    """Store the registration ``x -> affine(x + d(x))`` (fixed -> moving, the mapping the command
    line's ``transform.h5`` holds) as the node's FromParent transform: one ``vtkGeneralTransform``
    of the displacement grid ``deformation`` (a :class:`fmsam.fields.Deformation`, on its own
    network grid) followed by the affine, both in RAS. Slicer resamples volumes under the node with
    it as it is (no inversion) and saves it as an ITK composite transform.
    """
    return _set_from_parent(transform_node,
                            _oriented_grid_transform(deformation.displacement, deformation.grid),
                            _linear_ras(affine_matrix(affine)))


def set_inverse_registration_transform(transform_node, affine, inverse_deformation):
    """Store the inverse registration ``y -> z + e(z)``, ``z = affine^-1(y)`` (moving -> fixed, the
    mapping the command line's ``inverse_transform.h5`` holds) as the node's FromParent transform:
    the inverse affine, then the inverse displacement grid (a :class:`fmsam.fields.Deformation`),
    in RAS. A fixed-space volume under the node is resampled onto the moving image's frame."""
    return _set_from_parent(transform_node, _linear_ras(np.linalg.inv(affine_matrix(affine))),
                            _oriented_grid_transform(inverse_deformation.displacement, inverse_deformation.grid))


def map_points_from_parent(transform_node, points_lps):
    """Points (n, 3) LPS through the node's FromParent transform (for a registration node: fixed
    points to moving points), as Slicer maps them; LPS (n, 3)."""
    transform = transform_node.GetTransformFromParent()
    ras = flip_lps_ras(points_lps)
    return flip_lps_ras(np.array([transform.TransformPoint(*map(float, point)) for point in ras]))


__all__ = ["GRID_INTERPOLATION_ATTRIBUTE", "LINEAR_GRID_INTERPOLATION", "nodes_of_class", "image_from_volume_node",
           "label_image_from_node", "shared_segment_values", "set_volume_from_image", "set_registration_transform",
           "set_inverse_registration_transform", "map_points_from_parent", "world_ijk_to_ras", "segment_names"]
