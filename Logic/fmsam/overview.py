"""The overview picture: fixed, moving, warped, checkerboard and the Jacobian map (one slice each)."""
import threading

import numpy as np
import SimpleITK as sitk


def _import_plotting():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def start_importing_matplotlib():
    """Import matplotlib (about 1 s) in a thread, so that it happens while a registration computes
    rather than after it; :func:`write_overview`'s own import then finds it done (or waits for it)."""
    thread = threading.Thread(target=_import_plotting, name="fmsam-matplotlib", daemon=True)
    thread.start()
    return thread


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


def write_overview(path, fixed, moving_on_fixed, warped, jacobian, report):
    """Write a PNG with five panels; the Jacobian uses a diverging map centred on 1 (blue:
    contraction, red: expansion) with folding (det <= 0) drawn in black."""
    _import_plotting()
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, TwoSlopeNorm

    spacing_kji = fixed.GetSpacing()[::-1]
    axis = display_axis(fixed.GetSize()[::-1])
    panels = []
    for title, image in (("fixed", fixed), ("moving (unregistered)", moving_on_fixed),
                         ("warped moving", warped)):
        panels.append((title, *_display_slices(image, spacing_kji, axis)))
    fixed_slice, aspect = panels[0][1], panels[0][2]
    normalise = lambda a: (a - _window(a)[0]) / (_window(a)[1] - _window(a)[0])  # noqa: E731
    board = checkerboard(np.clip(normalise(fixed_slice), 0, 1), np.clip(normalise(panels[2][1]), 0, 1))
    jacobian_slice = _display_slices(jacobian, spacing_kji, axis)[0]

    figure, axes = plt.subplots(1, 5, figsize=(17, 4.2))
    for axis, (title, array, _) in zip(axes[:3], panels):
        low, high = _window(array)
        axis.imshow(array, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin="lower")
        axis.set_title(title)
    axes[3].imshow(board, cmap="gray", vmin=0, vmax=1, aspect=aspect, origin="lower")
    axes[3].set_title("checkerboard fixed / warped")
    colours = plt.get_cmap("RdBu_r")(np.linspace(0, 1, 256))
    colours[0] = (0, 0, 0, 1)  # the lowest bin (det <= 0 after clipping) is black: folding
    cmap = ListedColormap(colours)
    shown = axes[4].imshow(np.clip(jacobian_slice, 1e-3, 2.0), cmap=cmap,
                           norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0), aspect=aspect,
                           origin="lower")
    axes[4].set_title("det J (folding %.3f %%)" % report["folding_percent"])
    figure.colorbar(shown, ax=axes[4], fraction=0.046, pad=0.04, label="det J (1 = volume kept)")
    for axis in axes:
        axis.axis("off")
    summary = "registered on %s" % report["device"]  # no time: equal results, equal bytes
    if "dice_after" in report:
        summary += "   Dice affine %.3f -> registered %.3f" % (report["dice_affine"], report["dice_after"])
    figure.suptitle(summary)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
