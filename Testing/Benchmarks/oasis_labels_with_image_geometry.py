"""Copies of the OASIS pair's label maps carrying their images' geometry.

The label files of ../shared/data/oasis_pair hold the same voxel grid as their images but a
different header (spacing 0.98 x 0.97 x 1 mm, shifted origin). fmsam refuses labels whose grid
differs from the image's, so the benchmark uses copies whose header is the image's. The voxels are
not touched. Usage: python3 oasis_labels_with_image_geometry.py OASIS_DIR OUT_DIR
"""
import os
import sys

import SimpleITK as sitk


def main(oasis_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for subject in ("A", "B"):
        image = sitk.ReadImage(os.path.join(oasis_dir, "image_%s_160x192x144.nii.gz" % subject))
        labels = sitk.ReadImage(os.path.join(oasis_dir, "image_%s_160x192x144_seg.nii.gz" % subject))
        if labels.GetSize() != image.GetSize():
            raise SystemExit("label map %s does not have its image's voxel grid" % subject)
        labels.CopyInformation(image)
        sitk.WriteImage(labels, os.path.join(out_dir, "seg_%s.nii.gz" % subject), useCompression=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
