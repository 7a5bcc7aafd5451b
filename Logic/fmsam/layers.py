"""Differentiable spatial operations on the network grid.

Displacement tensors have shape ``(N, 3, D, H, W)`` with channels ordered ``(x, y, z)`` (= ``i, j, k``
of the grid, matching ``torch.nn.functional.grid_sample``) and values in *normalised* coordinates:
the grid spans [-1, 1] along each axis, first and last voxel centres at -1 and 1
(``align_corners=True``). Normalised displacements do not depend on the grid's resolution, so a
field can be resized to another grid over the same extent without rescaling its values.

A displacement ``u`` maps a point ``x`` of the fixed image to ``x + u(x)`` in the moving image; the
moving image warped into the fixed frame is ``moving(x + u(x))``.
"""
import functools

import torch
import torch.nn.functional as F


def identity_grid(shape, device=None, dtype=torch.float32):
    """Normalised coordinates of the voxel centres of a ``(D, H, W)`` grid: ``(1, D, H, W, 3)``."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).unsqueeze(0)


def sample_at(volume, points, mode="bilinear", padding_mode="zeros"):
    """Sample ``volume`` (N, C, D', H', W') at normalised points (N, D, H, W, 3), ordered (x, y, z);
    returns (N, C, D, H, W). ``mode='nearest'`` for label maps.

    PyTorch's 3-D sampler on a CPU runs one thread per batch item, so a single volume (N = 1) is
    sampled on one core however many there are. Without gradients its points are therefore split
    into one batch item per thread, over the same volume (a view, not a copy): the same numbers,
    bit for bit and C-contiguous as PyTorch returns them, in about 0.6 times the time on two cores (an
    80 x 100 x 100 field, 3 channels, at uniformly random points: 0.063 s -> 0.038 s; :func:`warp` of
    it by a small displacement, whose points are near each other in memory: 0.036 s -> 0.019 s). With
    gradients the plain call runs, so training and instance optimisation sum their gradients exactly
    as before. 2-D inputs are passed to PyTorch as they are."""
    chunks = _cpu_chunks(volume, points)
    if chunks == 1:
        return F.grid_sample(volume, points, mode=mode, padding_mode=padding_mode, align_corners=True)
    shape, count = points.shape[1:4], points[0, ..., 0].numel()
    per_chunk = -(-count // chunks)
    flat = points.reshape(count, 3)
    if per_chunk * chunks != count:
        flat = F.pad(flat, (0, 0, 0, per_chunk * chunks - count))
    sampled = F.grid_sample(volume.expand(chunks, -1, -1, -1, -1), flat.view(chunks, per_chunk, 1, 1, 3),
                            mode=mode, padding_mode=padding_mode, align_corners=True)  # (chunks, C, per_chunk, 1, 1)
    channels = volume.shape[1]
    return sampled.view(chunks, channels, per_chunk).transpose(0, 1).reshape(channels, -1)[:, :count] \
        .reshape(1, channels, *shape).contiguous()  # a copy only where padding was cut off


#: Fewest points per thread worth a split of :func:`sample_at`. Medians of 40 calls, 3-channel field
#: on 2 cores: 409 600 points 15.0 ms in one call, 10.5 ms split in two; 800 000 points 32 ms, 22 ms;
#: 262 144 points 10.5-15.5 ms against 13.4-24.0 ms split (no gain); and 13 824 points took 12 ms
#: split against 0.5 ms in one call (waking the second thread). Network grids (about 800 000) split.
MIN_POINTS_PER_THREAD = 200000


def _cpu_chunks(volume, points):
    """Batch items :func:`sample_at` splits a single volume's points into: one unless on a CPU, one
    3-D volume, no gradient asked for, more than one thread and enough points."""
    if volume.dim() != 5 or volume.device.type != "cpu" or volume.shape[0] != 1 or points.shape[0] != 1:
        return 1
    if torch.is_grad_enabled() and (volume.requires_grad or points.requires_grad):
        return 1
    count = points[0, ..., 0].numel()
    return max(1, min(torch.get_num_threads(), count // MIN_POINTS_PER_THREAD))


@functools.lru_cache(maxsize=2)
def _identity_grid_of(shape, device, dtype):
    """:func:`identity_grid`, kept for the next :func:`warp` on the same grid (inference warps one
    grid some 30 times, about 1 ms each to build); never modified in place. The last two grids stay
    in memory while the process lives (9.6 MB each at 80 x 100 x 100, on the device that used it)."""
    return identity_grid(shape, device, dtype)


def warp(volume, displacement, mode="bilinear", padding_mode="zeros"):
    """Sample ``volume`` (N, C, D', H', W') at ``x + displacement(x)`` for every point x of the
    displacement's grid; returns (N, C, D, H, W). ``mode='nearest'`` for label maps."""
    grid = _identity_grid_of(tuple(displacement.shape[2:]), displacement.device, displacement.dtype)
    return sample_at(volume, grid + displacement.permute(0, 2, 3, 4, 1), mode, padding_mode)


def compose(outer, inner):
    """Displacement of the map ``x -> outer_map(inner_map(x))``: ``inner(x) + outer(x + inner(x))``."""
    return inner + warp(outer, inner, padding_mode="border")


def invert(displacement, iterations=5, initial=None, step=1.0):
    """Displacement of the inverse map, by the fixed-point iteration ``v <- (1 - step) v + step
    (-u(x + v(x)))`` started from ``initial`` (default ``-u``). Undamped (``step`` 1) it converges for
    smooth maps whose displacement changes by less than a voxel per voxel; a smaller step also
    where it changes faster."""
    inverse = -displacement if initial is None else initial
    for _ in range(iterations):
        update = -warp(displacement, inverse, padding_mode="border")
        inverse = update if step == 1.0 else (1.0 - step) * inverse + step * update
    return inverse


def resize(volume, shape):
    """Resample a (N, C, D, H, W) volume or displacement to ``shape`` over the same extent
    (trilinear, voxel centres of the first and last voxels kept in place)."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    return F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=True)


def gaussian_smooth(volume, sigma):
    """Gaussian smoothing of each channel of a (N, C, D, H, W) volume, ``sigma`` in voxels of its grid
    (separable, kernel radius 2.5 sigma, borders extended by their edge values)."""
    radius = max(1, int(round(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-offsets ** 2 / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    channels = volume.shape[1]
    for axis in range(3):  # D, H, W
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0, 0, 0, 0]  # F.pad order: W, H, D
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = radius
        weights = kernel.view(shape).expand(channels, *shape[1:])  # one kernel per channel
        volume = F.conv3d(F.pad(volume, padding, mode="replicate"), weights, groups=channels)
    return volume


def _half_extent(displacement):
    """Voxels per normalised unit along (x, y, z) of the displacement's own grid, (1, 3, 1, 1, 1)."""
    sizes = displacement.shape[2:]  # D, H, W
    half_extent = torch.tensor([(sizes[2] - 1) / 2.0, (sizes[1] - 1) / 2.0, (sizes[0] - 1) / 2.0],
                               device=displacement.device, dtype=displacement.dtype)
    return half_extent.clamp_min(0.5).view(1, 3, 1, 1, 1)


def normalised_to_voxels(displacement):
    """Convert a normalised displacement to voxel units of its own grid (same shape)."""
    return displacement * _half_extent(displacement)


def voxels_to_normalised(displacement):
    """Convert a displacement in voxel units of its own grid to normalised coordinates."""
    return displacement / _half_extent(displacement)
