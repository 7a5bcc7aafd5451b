"""The overview picture (fmsam.overview): the Jacobian's colours and what the PNG shows."""
import numpy as np
import SimpleITK as sitk
from PIL import Image

from fmsam.overview import JACOBIAN_RANGE, jacobian_colours, write_overview


def test_jacobian_colours_are_white_at_one_black_when_folding_and_diverge():
    colours = jacobian_colours(np.array([-0.5, 0.0, 0.005, 0.02, 1.0, 2.0, 7.0]))
    assert colours.shape == (7, 3) and colours.dtype == np.uint8
    assert np.all(colours[:3] == 0)                        # det J < 2/256 (folding included): black
    assert colours[3, 2] > 80 and colours[3, 0] < 10        # a strong contraction: dark blue
    assert np.all(np.abs(colours[4].astype(int) - 247) <= 4)  # det J = 1: near white (RdBu's centre)
    assert tuple(colours[5]) == (103, 0, 31) == tuple(colours[6])  # the top and beyond: dark red
    assert JACOBIAN_RANGE == (0.0, 2.0)
    assert np.all(jacobian_colours(np.array([np.nan])) == 0)  # undefined: black, not an error


def _image(array, spacing):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    return image


def test_overview_draws_five_panels_and_shows_folding_in_black(tmp_path):
    rng = np.random.default_rng(0)
    shape = (12, 40, 50)  # (k, j, i): the slice axis is k
    fixed = _image(rng.random(shape), (1.0, 1.0, 3.0))
    jacobian_array = np.ones(shape, dtype=np.float32)
    jacobian_array[:, 10:20, 10:20] = -1.0  # folding in the middle slice too
    report = {"device": "cpu", "folding_percent": 5.0, "dice_affine": 0.5, "dice_after": 0.6}
    path = str(tmp_path / "overview.png")
    write_overview(path, fixed, fixed, fixed, _image(jacobian_array, (1.0, 1.0, 3.0)), report)
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"tIME" not in data  # no time: equal runs, equal bytes
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width = picture.shape[:2]
    assert 250 < height < 450 and 1400 < width < 1800
    # Folding is a solid black square in the Jacobian panel (the fifth, at the right); the grey
    # panels of a random image and the black title text hold no solid black 50 x 50 block.
    black = np.all(picture == 0, axis=-1).astype(int)
    sums = np.pad(black, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    block = sums[50:, 50:] - sums[:-50, 50:] - sums[50:, :-50] + sums[:-50, :-50]
    rows, columns = np.nonzero(block == 2500)
    assert columns.size and columns.min() > width * 0.75, columns
    # 10 x 10 voxels of 1 mm drawn 6 pixels each (a 50-column slice in a 300-pixel panel): the
    # square's corners are 60 pixels apart both ways (the slice plane's pixels are square)
    assert 8 <= rows.max() - rows.min() <= 12 and 8 <= columns.max() - columns.min() <= 12


def test_a_narrow_or_flat_slice_keeps_readable_slots(tmp_path):
    """A slice 5 voxels wide (or high) is drawn with its aspect inside a slot of MIN_SLOT, so the
    five titles and the colour bar's ticks have room."""
    from fmsam.overview import MIN_SLOT

    report = {"device": "cpu", "folding_percent": 0.0}
    for shape in ((3, 400, 5), (3, 5, 400)):
        image = _image(np.random.default_rng(1).random(shape), (1.0, 1.0, 1.0))
        path = str(tmp_path / ("%d_%d.png" % shape[1:]))
        write_overview(path, image, image, image, _image(np.ones(shape), (1.0, 1.0, 1.0)), report)
        width, height = Image.open(path).size
        assert width >= 5 * MIN_SLOT[0] and height >= MIN_SLOT[1], (shape, width, height)
