"""Making ITK's HDF5 transform files byte-reproducible, with the standard library alone.

ITK writes ``.h5`` transforms with HDF5 version-2 object headers, which store the access,
modification, change and birth times of each object (4-byte seconds) and end with a Jenkins
lookup3 checksum of the header. Two runs one second apart therefore differ in about 120 bytes
although the arrays are equal. :func:`clear_object_times` sets those times to 0 and recomputes each
header's checksum, in place: the file stays a valid HDF5 file that ITK, SimpleITK and Slicer read
as before, and identical transforms give identical bytes.
"""
import mmap
import struct

_MASK = 0xFFFFFFFF
#: Version-2 object header flag: the four times are stored (HDF5 file format, section IV.A.1.b).
_TIMES_STORED = 0x20
#: Flag: the maximum compact / minimum dense attribute counts (2 x 2 bytes) are stored.
_ATTRIBUTE_PHASE_CHANGE = 0x10


def _rotate(value, bits):
    return ((value << bits) | (value >> (32 - bits))) & _MASK


#: lookup3's mix(): (x, y, rotation, z, w) for ``x -= y; x ^= rot(y, rotation); z += w``, a=0 b=1 c=2.
_MIX = ((0, 2, 4, 2, 1), (1, 0, 6, 0, 2), (2, 1, 8, 1, 0), (0, 2, 16, 2, 1), (1, 0, 19, 0, 2),
        (2, 1, 4, 1, 0))
#: lookup3's final(): (x, y, rotation) for ``x ^= y; x -= rot(y, rotation)``.
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def _mix(values):
    for x, y, bits, z, w in _MIX:
        values[x] = ((values[x] - values[y]) & _MASK) ^ _rotate(values[y], bits)
        values[z] = (values[z] + values[w]) & _MASK
    return values


def _final(values):
    for x, y, bits in _FINAL:
        values[x] = ((values[x] ^ values[y]) - _rotate(values[y], bits)) & _MASK
    return values[2]


def _add(values, data, offset):
    words = struct.unpack_from("<3I", data, offset)
    return [(value + word) & _MASK for value, word in zip(values, words)]


def lookup3(data, initial=0):
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data`` (bytes): HDF5's metadata checksum."""
    length = len(data)
    values = [(0xDEADBEEF + length + initial) & _MASK] * 3
    offset = 0
    while length - offset > 12:
        values = _mix(_add(values, data, offset))
        offset += 12
    if length == offset:
        return values[2]
    return _final(_add(values, bytes(data[offset:]) + bytes(12 - (length - offset)), 0))


def _object_header(data, start):
    """``(offset of the times or None, offset of the checksum)`` of a version-2 object header
    at ``start``, or None when the bytes there are not one (checksum mismatch)."""
    if start + 6 > len(data) or data[start + 4] != 2:
        return None
    flags = data[start + 5]
    position = start + 6
    times = position if flags & _TIMES_STORED else None
    position += 16 if flags & _TIMES_STORED else 0
    position += 4 if flags & _ATTRIBUTE_PHASE_CHANGE else 0
    width = 1 << (flags & 3)
    chunk = int.from_bytes(data[position:position + width], "little")
    checksum = position + width + chunk
    if checksum + 4 > len(data):
        return None
    if lookup3(data[start:checksum]) != struct.unpack_from("<I", data, checksum)[0]:
        return None
    return times, checksum


def clear_object_times(path):
    """Zero the times in every version-2 object header of the HDF5 file ``path`` and update the
    headers' checksums, in place (only those bytes are written). Returns the number of headers
    changed. Bytes that merely look like a header (``OHDR`` inside data) are left alone: their
    checksum does not match."""
    changed = 0
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as data:
        start = data.find(b"OHDR")
        while start >= 0:
            header = _object_header(data, start)
            if header is not None and header[0] is not None:
                times, checksum = header
                data[times:times + 16] = bytes(16)
                data[checksum:checksum + 4] = struct.pack("<I", lookup3(data[start:checksum]))
                changed += 1
            start = data.find(b"OHDR", start + 4)
        data.flush()
    return changed
