"""The overview picture: fixed, moving, warped, checkerboard and the Jacobian map (one slice each).

Drawn with Pillow from NumPy arrays (about 0.05 s); matplotlib, which drew it before, cost 0.6-0.7 s
of a 4 s fast-mode command (0.4 s to import, 0.3 s to draw).
"""
import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

#: An array axis with fewer voxels than this is a stack's slice axis: the picture shows the slice
#: plane (across it), never a view along it (a strip a few voxels wide).
THIN_AXIS = 16


def display_axis(shape_kji):
    """The array axis the overview slices across: k (axial for a head in the training layout),
    unless another axis has fewer than :data:`THIN_AXIS` voxels and fewer than k; then that one,
    so a thin stack is shown in its slice plane whichever way its voxels are stored."""
    thinnest = int(np.argmin(shape_kji))
    if shape_kji[thinnest] < THIN_AXIS and shape_kji[thinnest] < shape_kji[0]:
        return thinnest
    return 0


def _display_slices(image, spacing_kji, axis=0):
    """Middle slice across array ``axis`` of a (k, j, i) image or array, and its display aspect
    (height over width of a pixel, in mm)."""
    array = sitk.GetArrayViewFromImage(image) if isinstance(image, sitk.Image) else image
    middle = array.shape[axis] // 2
    rows, cols = [a for a in range(3) if a != axis]
    aspect = spacing_kji[rows] / spacing_kji[cols]
    return np.asarray(np.take(array, middle, axis=axis), dtype=np.float64), aspect


def _window(array):
    low, high = np.percentile(array, [1, 99])
    return low, high if high > low else low + 1


def checkerboard(first, second, tiles=8):
    """Alternate square tiles of two equally shaped 2D arrays."""
    rows, cols = np.indices(first.shape)
    mask = ((rows * tiles // first.shape[0]) + (cols * tiles // first.shape[1])) % 2 == 0
    return np.where(mask, first, second)


#: ColorBrewer's 11-class RdBu, blue (low) to red (high): matplotlib's ``RdBu_r``, whose 256
#: colours are these interpolated linearly.
_RDBU_R = np.array([(5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240),
                    (247, 247, 247), (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43),
                    (103, 0, 31)], dtype=np.float64)
#: The Jacobian panel's range: det J from 0 to 2 over 256 colours, 1 (volume kept) white.
JACOBIAN_RANGE = (0.0, 2.0)
PANEL = 300  # pixels: each panel fits a PANEL x PANEL box
#: Each panel's slot is at least this wide and every row of panels at least this high (pixels), so
#: that titles and the colour bar stay readable when a slice is very narrow or very flat (the slice
#: itself keeps its aspect, centred in its slot).
MIN_SLOT = (200, 160)
MARGIN = 12
TITLE = 24  # pixels above each panel
SUPTITLE = 30


def jacobian_colours(determinant):
    """RGB uint8 colours of det J values (any shape; adds a last axis of 3): the diverging map
    centred on 1 (blue: contraction, red: expansion), clipped to :data:`JACOBIAN_RANGE`, with the
    lowest of its 256 bins (det J < 2/256, folding included) black."""
    low, high = JACOBIAN_RANGE
    values = np.nan_to_num(np.asarray(determinant, dtype=np.float64), nan=low)  # undefined: black
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    index = np.minimum((scaled * 256).astype(np.int64), 255)
    anchors = np.linspace(0.0, 1.0, len(_RDBU_R))
    table = np.stack([np.interp(np.linspace(0.0, 1.0, 256), anchors, _RDBU_R[:, c]) for c in range(3)],
                     axis=1)
    table = np.round(table).astype(np.uint8)
    table[0] = 0  # black: folding
    return table[index]


def _grey(array, low, high):
    return (np.clip((array - low) / (high - low), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _panel(pixels, aspect, nearest=False):
    """A PIL image of a (rows, cols[, 3]) array drawn with row 0 at the bottom (the array's first
    row is the image's lowest), each array pixel ``aspect`` times as high as wide, scaled to fit
    :data:`PANEL`."""
    rows, cols = pixels.shape[:2]
    scale = min(PANEL / cols, PANEL / (rows * aspect))
    size = (max(1, int(round(cols * scale))), max(1, int(round(rows * aspect * scale))))
    image = Image.fromarray(np.ascontiguousarray(pixels[::-1]))
    return image.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # Pillow 9.2-10.0: the bitmap font (textbbox measures it since 9.2)
        return ImageFont.load_default()


def _text(draw, xy, text, font, centred=True):
    """Draw ``text`` with its vertical middle at ``xy[1]``, centred on ``xy[0]`` or starting there
    (placed from its measured box: Pillow's anchors need a scalable font)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (right - left) // 2 - left if centred else xy[0] - left
    draw.text((x, xy[1] - (top + bottom) // 2), text, fill="black", font=font)


def _colour_bar(canvas, draw, left, top, height, font):
    """A vertical colour bar of :func:`jacobian_colours` with ticks at 0, 0.5, 1, 1.5 and 2."""
    low, high = JACOBIAN_RANGE
    values = high - (np.arange(height) + 0.5) / height * (high - low)
    canvas.paste(Image.fromarray(np.repeat(jacobian_colours(values)[:, None, :], 14, axis=1)), (left, top))
    for tick in np.linspace(low, high, 5):
        y = top + int(round((high - tick) / (high - low) * (height - 1)))
        draw.line([(left + 14, y), (left + 18, y)], fill="black")
        _text(draw, (left + 21, y), "%g" % tick, font, centred=False)


def write_overview(path, fixed, moving_on_fixed, warped, jacobian, report):
    """Write a PNG with five panels (fixed, moving before registration, warped moving, a
    checkerboard of fixed and warped, det J) through the middle of the fixed image; the Jacobian
    uses a diverging map centred on 1 (blue: contraction, red: expansion) with folding (det <= 0)
    drawn in black, and a colour bar."""
    spacing_kji = fixed.GetSpacing()[::-1]
    axis = display_axis(fixed.GetSize()[::-1])
    slices = [_display_slices(image, spacing_kji, axis)[0] for image in (fixed, moving_on_fixed, warped)]
    aspect = _display_slices(fixed, spacing_kji, axis)[1]
    windows = [_window(array) for array in slices]
    greys = [_grey(array, *window) for array, window in zip(slices, windows)]
    board = checkerboard(greys[0], greys[2])
    jacobian_slice = _display_slices(jacobian, spacing_kji, axis)[0]
    panels = [(_panel(grey, aspect), title) for grey, title in
              zip(greys + [board], ("fixed", "moving (unregistered)", "warped moving",
                                    "checkerboard fixed / warped"))]
    panels.append((_panel(jacobian_colours(jacobian_slice), aspect, nearest=True),
                   "det J (folding %.3f %%)" % report["folding_percent"]))

    height = max([MIN_SLOT[1]] + [panel.size[1] for panel, _ in panels])
    slots = [max(MIN_SLOT[0], panel.size[0]) for panel, _ in panels]
    bar_width = 60
    width = MARGIN + sum(slot + MARGIN for slot in slots) + bar_width
    canvas = Image.new("RGB", (width, SUPTITLE + TITLE + height + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    font, large = _font(14), _font(16)
    summary = "registered on %s" % report["device"]  # no time: equal results, equal bytes
    if "dice_after" in report:
        summary += "   Dice affine %.3f -> registered %.3f" % (report["dice_affine"], report["dice_after"])
    _text(draw, (width // 2, SUPTITLE // 2 + 2), summary, large)
    left = MARGIN
    for (panel, title), slot in zip(panels, slots):
        top = SUPTITLE + TITLE + (height - panel.size[1]) // 2
        canvas.paste(panel.convert("RGB"), (left + (slot - panel.size[0]) // 2, top))
        _text(draw, (left + slot // 2, SUPTITLE + TITLE // 2), title, font)
        left += slot + MARGIN
    _colour_bar(canvas, draw, left, SUPTITLE + TITLE, height, font)
    canvas.save(path, format="PNG")
