"""IXI pairs made unfamiliar: changed contrast and thick slices, for the cross-dataset benchmark.

For each pair of a pairs CSV, both images are resampled to thick slices (2 x 2 x 6 mm by default:
6 mm along the axis closest to superior-inferior), their label maps with nearest neighbour, and
the moving image's contrast is changed:

* ``inverted``: inside the head (voxels above 5 % of the 99th percentile) the intensity is
  reversed, which turns the T1 contrast into a T2-like one; the background stays dark;
* ``gamma``: intensities (scaled to [0, 1] by the 99th percentile) raised to the power 2.5.

Writes the images under OUT/<variant>/ and OUT/<variant>_pairs.csv (paths relative to it).
Usage: python3 make_unfamiliar.py --pairs ixi_val_pairs30.csv --out out/unfamiliar [--limit 10]
"""
import argparse
import csv
import os
import sys

import numpy as np
import SimpleITK as sitk

# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Logic"))

from fmsam.evaluate import read_pairs  # noqa: E402

VARIANTS = ("inverted", "gamma")


def thick_grid(image, thickness_mm=6.0, in_plane_mm=2.0):
    """A grid covering ``image`` with ``thickness_mm`` along the axis nearest superior-inferior."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    si_axis = int(np.argmax(np.abs(direction[2, :])))  # LPS z is superior
    spacing = [in_plane_mm] * 3
    spacing[si_axis] = thickness_mm
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [max(1, int(round(e / s))) for e, s in zip(extent, spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing(spacing)
    # Keep the physical centre of the field of view.
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    corner_offset = direction @ (np.array(spacing) * (np.array(size) - 1) / 2.0)
    grid.SetOrigin(tuple(np.array(centre) - corner_offset))
    return grid


def thick(image, labels=False, thickness_mm=6.0, in_plane_mm=2.0):
    """Thick slices (:func:`thick_grid`): blurred along the slice axis (as a thick acquisition
    averages), then sampled."""
    grid = thick_grid(image, thickness_mm, in_plane_mm)
    if labels:
        return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    sigma = [max(0.01, (g - s) / 2.355) for g, s in zip(grid.GetSpacing(), image.GetSpacing())]
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    return sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def change_contrast(image, variant):
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(np.percentile(voxels, 99))
    scaled = np.clip(voxels / top, 0.0, 1.0)
    if variant == "inverted":
        head = scaled > 0.05
        scaled = np.where(head, 1.05 - scaled, 0.0)
    elif variant == "gamma":
        scaled = scaled ** 2.5
    else:
        raise ValueError(variant)
    result = sitk.GetImageFromArray((scaled * 1000.0).astype(np.float32))
    result.CopyInformation(image)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    pairs = read_pairs(args.pairs)[: args.limit or None]
    for variant in args.variants.split(","):
        folder = os.path.join(args.out, variant)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for pair in pairs:
            row = {}
            for role in ("fixed", "moving"):
                name = os.path.basename(pair[role]).replace(".nii.gz", "")
                image = thick(sitk.ReadImage(pair[role]))
                if role == "moving":
                    image = change_contrast(image, variant)
                    name += "_" + variant
                path = os.path.join(folder, name + "_thick.nii.gz")
                if not os.path.exists(path):
                    sitk.WriteImage(image, path, useCompression=True)
                labels_name = os.path.basename(pair[role + "_labels"]).replace(".nii.gz", "_thick.nii.gz")
                labels_path = os.path.join(folder, labels_name)
                if not os.path.exists(labels_path):
                    sitk.WriteImage(thick(sitk.ReadImage(pair[role + "_labels"]), labels=True), labels_path,
                                    useCompression=True)
                row[role] = os.path.relpath(path, args.out)
                row[role + "_labels"] = os.path.relpath(labels_path, args.out)
            rows.append(row)
        with open(os.path.join(args.out, variant + "_pairs.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, ("fixed", "moving", "fixed_labels", "moving_labels"))
            writer.writeheader()
            writer.writerows(rows)
        print("%s: %d pairs in %s" % (variant, len(rows), folder))


if __name__ == "__main__":
    main()
