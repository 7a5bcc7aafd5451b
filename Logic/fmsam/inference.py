"""Running the network on a pre-aligned pair: device choice, network grid, CUDA fallback."""
import warnings

import numpy as np
import torch

from .layers import invert, resize
from .networks import network_grid_shape
from .options import DEVICES


def cuda_usable():
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # broken driver installs raise here rather than returning False
        return False


def choose_device(name="auto"):
    """'auto' -> CUDA when usable, else CPU. Asking for CUDA without a usable GPU is an error."""
    from .errors import InputError

    if name not in DEVICES:
        raise InputError("device must be one of %s, not %r" % (", ".join(DEVICES), name))
    if name == "auto":
        return torch.device("cuda" if cuda_usable() else "cpu")
    if name == "cuda" and not cuda_usable():
        raise InputError("device 'cuda' was requested but no usable CUDA GPU was found")
    return torch.device(name)


#: Fewest network voxels along any axis: the coarse step runs at half resolution and its U-Net
#: halves three more times, so 16 leaves it one voxel at the bottom.
MIN_GRID = 16


def grid_for(fixed_image, config):
    """Network grid (D, H, W) for a fixed SimpleITK image, at the voxel budget of training.

    The grid keeps the image's physical aspect ratio, so network voxels are cubes in millimetres as
    in training, whatever the image's own voxels. A thin anisotropic stack therefore gets many
    network voxels across its slices, not one per slice: a 350 x 350 mm short-axis stack of three
    23 mm slices (69 mm) becomes 32 x 160 x 160 voxels of 2.2 mm, its slices linearly interpolated,
    rather than 3 x 500 x 500 voxels 10 times thicker than wide, an anisotropy the network never
    saw. No axis gets fewer than :data:`MIN_GRID` voxels (a 2-slice 24 mm stack: 16)."""
    size = np.array(fixed_image.GetSize()[::-1], dtype=np.float64)       # k, j, i
    spacing = np.array(fixed_image.GetSpacing()[::-1], dtype=np.float64)
    budget = int(np.prod(config.get("grid", (64, 80, 80))))
    return tuple(max(MIN_GRID, n) for n in network_grid_shape(size * spacing, voxels=budget))


def to_network_grid(voxels_kji, grid, device):
    """A (k, j, i) numpy volume as a (1, 1, D, H, W) tensor resized to the network grid."""
    tensor = torch.from_numpy(np.array(voxels_kji, dtype=np.float32))[None, None]  # own, writable copy
    return resize(tensor.to(device), grid)


def run_with_cpu_fallback(function, device, *args):
    """Call ``function(device, *args)``; on CUDA out-of-memory, warn and run it on the CPU.

    Returns ``(result, device actually used)``.
    """
    try:
        return function(device, *args), device
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warnings.warn("CUDA ran out of memory; running on the CPU instead")
        cpu = torch.device("cpu")
        return function(cpu, *args), cpu


def symmetric_displacement(forward, backward):
    """The fixed-to-moving displacement as the mean of the network's two estimates of it: the forward
    one and the inverse of the backward (moving-to-fixed) one. Both (1, 3, D, H, W), normalised.

    A network's errors are partly systematic: given one image twice, the bundled model still moves it
    by about 1.3 mm, the same way in both directions, which this cancels (0.05 mm), and averaging two
    estimates also raised Dice on 8 IXI pairs from 0.550 to 0.561, for one more network pass
    (about 0.3 s on a CPU). Measured in docs/benchmarks.md.
    """
    return 0.5 * (forward + invert(backward))
