"""Accurate mode's instance optimisation on an image grid finer than the network's (issue 15,
trial A1): the grid it compares the images on, and refinement of network-grid fields against images
on a finer grid."""
import pytest
import torch

import fmsam.inference as inference
import fmsam.instance_optimisation as io
from fmsam.layers import resize
from fmsam.losses import symmetric_registration_loss


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


def test_corrections_are_half_the_fields_grid_by_default(monkeypatch):
    """The corrections' grid, read where instance_optimise upsamples them: (n + 1) // 2 per axis, at
    least 2, as before the scale became a constant (outputs byte-identical)."""
    assert io.CORRECTION_SCALE == 0.5
    seen = []
    real_resize = io.resize

    def recording_resize(volume, shape):
        if volume.shape[:2] == (2, 3):  # the two fields' corrections
            seen.append(tuple(volume.shape[2:]))
        return real_resize(volume, shape)

    monkeypatch.setattr(io, "resize", recording_resize)
    for shape in ((3, 4, 5), (5, 40, 41), (81, 4, 7)):
        zero = torch.zeros((1, 3) + shape)
        image = torch.rand((1, 1) + shape)
        io.instance_optimise(zero, zero, image, image, 1, {"ncc_window": 3})  # 3 x 4 x 5: corrections 2 x 2 x 3
        assert seen[-1] == tuple(max(2, (n + 1) // 2) for n in shape)
    assert seen[-1] == (41, 2, 4)


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
    # the loss reported after the last step is the similarity on the 32-voxel images (sampled at their
    # points, no shift), not on images brought to the fields' grid
    after = symmetric_registration_loss(fixed, moving, forward, backward, io.GRADICON_WEIGHT, 5, torch.zeros(3))[0]
    assert abs(losses[-1] - float(after)) < 1e-5
    coarse = symmetric_registration_loss(resize(fixed, fields_shape), resize(moving, fields_shape), forward, backward,
                                         io.GRADICON_WEIGHT, 5)[0]
    assert abs(losses[-1] - float(coarse)) > 0.1  # measured 1.265 against 0.864
    centre = (slice(None), 0, 7, 7, 7)  # x component, one of the two nodes nearest the fixed ball's centre (x = -0.067)
    assert 0.06 < float(forward[centre]) < 0.14  # measured 0.108
    assert -0.14 < float(backward[(slice(None), 0, 7, 7, 8)]) < -0.06  # measured -0.095


@pytest.mark.parametrize("scale, io_shape", [(1.0, None), (1.5, (12, 15, 18))])
def test_accurate_mode_is_given_images_on_the_instance_optimisation_grid(monkeypatch, image_scale, scale, io_shape):
    """network_fields hands accurate mode images on the grid of instance_optimisation_grid, and none
    (the network grid's own images, as before) at 1.0; both the fixed and the compared moving image."""
    image_scale(scale)
    seen = {}

    def recording_accurate_fields(network, config, fixed_net, moving_net, steps, similarity, io_moving, progress,
                                  io_fixed):
        seen.update(net=tuple(fixed_net.shape[2:]), io_fixed=io_fixed, io_moving=io_moving)
        zero = torch.zeros((1, 3) + tuple(fixed_net.shape[2:]))
        return inference.NetworkFields(zero, zero, {})

    monkeypatch.setattr(inference, "accurate_fields", recording_accurate_fields)
    fixed, moving = torch.rand(20, 30, 24).numpy(), torch.rand(20, 30, 24).numpy()
    fields, _ = inference.network_fields(torch.nn.Identity(), {}, torch.device("cpu"), fixed, moving, (8, 10, 12),
                                         io_steps=3)
    assert seen["net"] == (8, 10, 12) and tuple(fields.forward.shape[2:]) == (8, 10, 12)
    if io_shape is None:
        assert seen["io_fixed"] is None and seen["io_moving"] is None
    else:
        assert tuple(seen["io_fixed"].shape[2:]) == tuple(seen["io_moving"].shape[2:]) == io_shape
        assert torch.allclose(seen["io_fixed"], resize(torch.from_numpy(fixed)[None, None], io_shape))
        assert torch.allclose(seen["io_moving"], resize(torch.from_numpy(moving)[None, None], io_shape))
