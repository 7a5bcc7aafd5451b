"""The raw voxel data of NIfTI files, read with the standard library and numpy alone.

ITK's NIfTI reader (SimpleITK, Slicer) turns NaN and infinite voxels into 0, so a poisoned image
would be registered as if it were clean. :func:`nifti_nonfinite_voxels` reads the header (NIfTI-1 or
NIfTI-2, either byte order, gzipped or not, single file or .hdr/.img pair) and counts non-finite
values in floating-point data itself, in blocks, without holding a second copy of the volume.
"""
import gzip
import os

import numpy as np

#: NIfTI datatype codes of real floating-point voxels -> numpy type (without byte order).
FLOAT_TYPES = {16: "f4", 64: "f8"}
#: Values read per block: 4M voxels, 16-32 MB.
BLOCK_VOXELS = 1 << 22


def _open(path):
    """A binary file object, decompressing when the file starts with gzip's magic number."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _layout(header):
    """``(numpy dtype, voxel count, data offset, single file?)`` from a NIfTI-1/2 header's bytes, or
    None when they are not a NIfTI header or the data is not real floating point."""
    for order in "<>":
        if len(header) >= 348 and np.frombuffer(header[:4], order + "i4")[0] == 348 \
                and header[344:347] in (b"n+1", b"ni1"):
            dim = np.frombuffer(header[40:56], order + "i2")
            datatype = int(np.frombuffer(header[70:72], order + "i2")[0])
            offset = int(np.frombuffer(header[108:112], order + "f4")[0])
            single = header[344:347] == b"n+1"
            break
        if len(header) >= 540 and np.frombuffer(header[:4], order + "i4")[0] == 540 \
                and header[4:7] in (b"n+2", b"ni2"):
            dim = np.frombuffer(header[16:80], order + "i8")
            datatype = int(np.frombuffer(header[12:14], order + "i2")[0])
            offset = int(np.frombuffer(header[168:176], order + "i8")[0])
            single = header[4:7] == b"n+2"
            break
    else:
        return None
    if datatype not in FLOAT_TYPES or not 1 <= dim[0] <= 7:
        return None
    count = int(np.prod([max(int(n), 1) for n in dim[1:dim[0] + 1]]))
    return np.dtype(order + FLOAT_TYPES[datatype]), count, offset, single


def _data_file(path):
    """The .img (or .img.gz) file holding the data of a .hdr header, or None."""
    for suffix, data_suffix in ((".hdr.gz", ".img.gz"), (".hdr", ".img")):
        if path.lower().endswith(suffix):
            for candidate in (data_suffix, data_suffix.upper()):
                data = path[:-len(suffix)] + candidate
                if os.path.isfile(data):
                    return data
    return None


def _count_nonfinite(handle, dtype, count):
    bad = 0
    while count > 0:
        block = handle.read(min(count, BLOCK_VOXELS) * dtype.itemsize)
        values = np.frombuffer(block[:len(block) - len(block) % dtype.itemsize], dtype)
        if values.size == 0:
            break  # a truncated file: ITK has already read (or refused) what is there
        bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        count -= values.size
    return bad


def nifti_nonfinite_voxels(path):
    """Number of NaN or infinite values in the floating-point data of the NIfTI file ``path``
    (0 for files that are not NIfTI, or whose voxels are integers)."""
    try:
        with _open(path) as handle:
            layout = _layout(handle.read(540))
            if layout is None:
                return 0
            dtype, count, offset, single = layout
            if single:
                handle.seek(offset)
                return _count_nonfinite(handle, dtype, count)
    except (OSError, EOFError):  # not gzip after all, truncated: ITK's reading decides
        return 0
    data = _data_file(path)
    if data is None:
        return 0
    with _open(data) as handle:
        handle.seek(offset)
        return _count_nonfinite(handle, dtype, count)
