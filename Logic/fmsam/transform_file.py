"""Writing a registration's transform as one ITK HDF5 composite transform file, displacements float32.

The file holds what :func:`fmsam.fields.registration_transform` builds: a ``CompositeTransform``
of an ``AffineTransform`` (double) and a ``DisplacementFieldTransform`` on the network grid, in
ITK's HDF5 layout (``/TransformGroup/0`` the composite, ``/1``, ``/2`` its parts in ITK's queue
order; the last one is applied first). ITK, SimpleITK (2.2+), ANTs and Slicer read it as one
transform. SimpleITK can only write double fields, which doubles the file; here the displacement
parameters are stored as 32-bit floats (ITK converts them when it reads: the precision in a type
name such as ``DisplacementFieldTransform_float_3_3`` is corrected to the reader's). A field of the
bundled model's grid (80 x 104 x 104, 84 x 108 x 108 with the cover of :func:`fmsam.fields.cover_fixed_voxels`) takes 12 MB instead of 23 MB, and neither grows with the
image's resolution.

Written with h5py when it is installed; otherwise SimpleITK writes the same transform in double
precision (the same mapping, a larger file). The times HDF5 stores are cleared
(:mod:`fmsam.hdf5`), so identical transforms give identical bytes.
"""
import os
import platform

import numpy as np
import SimpleITK as sitk

from .fields import as_affine_transform
from .hdf5 import clear_object_times


def _parts(transform):
    """The transforms of a (flat) composite in ITK's queue order, or ``[transform]``."""
    if isinstance(transform, sitk.CompositeTransform):
        return [transform.GetNthTransform(n) for n in range(transform.GetNumberOfTransforms())]
    return [transform]


def _entries(part):
    """``(ITK type name, fixed parameters float64, parameters)`` of one transform."""
    if part.GetTransformEnum() == sitk.sitkDisplacementField:
        field = sitk.DisplacementFieldTransform(part).GetDisplacementField()
        fixed = list(field.GetSize()) + list(field.GetOrigin()) + list(field.GetSpacing()) + list(field.GetDirection())
        values = sitk.GetArrayViewFromImage(field).astype(np.float32).ravel()
        return "DisplacementFieldTransform_float_3_3", np.array(fixed, dtype=np.float64), values
    affine = as_affine_transform(part)
    return ("AffineTransform_double_3_3", np.array(affine.GetFixedParameters(), dtype=np.float64),
            np.array(affine.GetParameters(), dtype=np.float64))


def _write_hdf5(transform, path, h5py):
    text = h5py.string_dtype("ascii")

    def string(group, name, value):
        group.create_dataset(name, data=np.array([value], dtype=object), dtype=text)

    with h5py.File(path, "w", libver="earliest") as handle:
        string(handle, "HDFVersion", "%d.%d.%d" % h5py.h5.get_libversion())
        string(handle, "ITKVersion", sitk.Version.ITKVersionString())
        string(handle, "OSName", platform.system())
        string(handle, "OSVersion", "")
        groups = handle.create_group("TransformGroup")
        number = 0
        if isinstance(transform, sitk.CompositeTransform):
            string(groups.create_group("0"), "TransformType", "CompositeTransform_double_3_3")
            number = 1
        for part in _parts(transform):
            group = groups.create_group(str(number))
            name, fixed, values = _entries(part)
            string(group, "TransformType", name)
            group.create_dataset("TransformFixedParameters", data=fixed)
            group.create_dataset("TransformParameters", data=values)
            number += 1


def write_transform(transform, path):
    """Write ``transform`` (a composite of linear and displacement-field transforms, or one of
    them) to the ITK HDF5 file ``path`` (``.h5``), displacement fields in float32. Written to a
    hidden file beside ``path`` and moved into place when complete: a failed write leaves nothing."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, ".fmsam-writing-%d-%s" % (os.getpid(), name))  # keeps the extension
    try:
        try:
            import h5py
        except ImportError:
            sitk.WriteTransform(transform, temporary)
        else:
            _write_hdf5(transform, temporary, h5py)
        clear_object_times(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
