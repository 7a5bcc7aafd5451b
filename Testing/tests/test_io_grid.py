"""Accurate mode's instance optimisation on an image grid finer than the network's (issue 15,
trial A1): the grid it compares the images on, and refinement of network-grid fields against images
on a finer grid."""
import math

import pytest
import torch

import fmsam.inference as inference
import fmsam.instance_optimisation as io


@pytest.fixture
def image_scale():
    saved = inference.IO_IMAGE_SCALE
    yield lambda value: setattr(inference, "IO_IMAGE_SCALE", value)
    inference.IO_IMAGE_SCALE = saved


def test_image_grid_is_the_network_grid_times_the_scale_capped_by_the_image(image_scale):
    image_scale(1.0)
    assert inference.instance_optimisation_grid((80, 104, 104), (90, 120, 120)) == (80, 104, 104)
    image_scale(1.5)
    # a 2 mm IXI head: the network grid is nearly the image's, so the image's own grid
    assert inference.instance_optimisation_grid((80, 104, 104), (90, 120, 120)) == (90, 120, 120)
    # the 1 mm OASIS pair: 1.5 x the network grid, below the image's 144 x 192 x 160
    assert inference.instance_optimisation_grid((80, 112, 88), (144, 192, 160)) == (120, 168, 132)
    # a stack of 4 thick slices: never coarser than the network grid along the slices
    assert inference.instance_optimisation_grid((32, 160, 160), (4, 480, 480)) == (32, 240, 240)


def test_corrections_are_half_the_fields_grid_by_default():
    # (n + 1) // 2 per axis, as before the scale became a constant (outputs byte-identical)
    assert io.CORRECTION_SCALE == 0.5
    assert [max(2, math.ceil(n * io.CORRECTION_SCALE)) for n in (3, 5, 40, 41, 81)] == [2, 3, 20, 21, 41]


def _blob(shape, centre_x):
    """A smooth ball on a (D, H, W) grid spanning [-1, 1] on every axis, centred at x = centre_x."""
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-((x - centre_x) ** 2 + y ** 2 + z ** 2) / (2 * 0.3 ** 2))[None, None]


def test_fields_on_the_network_grid_are_refined_against_images_on_a_finer_grid():
    """The moving ball lies 0.1 (normalised; 1.5 voxels of the 32-voxel image grid, 0.75 of the
    16-voxel field grid) further along x: refined from zero fields, the forward field at the ball's
    centre points there (+0.1 in x) and the backward one back; the fields keep their grid."""
    fields_shape, images_shape = (16, 16, 16), (32, 32, 32)
    fixed, moving = _blob(images_shape, 0.0), _blob(images_shape, 0.1)
    zero = torch.zeros((1, 3) + fields_shape)
    forward, backward, losses = io.instance_optimise(zero, zero, fixed, moving, 60, {"ncc_window": 5},
                                                     learning_rate=5e-3)
    assert forward.shape == backward.shape == (1, 3) + fields_shape
    assert losses[-1] < losses[0] - 0.03  # measured 1.311 -> 1.265 (mostly background, where LNCC stays)
    centre = (slice(None), 0, 7, 7, 7)  # x component, the node nearest the fixed ball's centre
    assert 0.06 < float(forward[centre]) < 0.14  # measured 0.108
    assert -0.14 < float(backward[(slice(None), 0, 7, 7, 8)]) < -0.06  # measured -0.095
