"""Write a pairs CSV for ``fmsam evaluate`` from the IXI data folder.

    python Testing/Benchmarks/make_pairs.py --data ../shared/data/ixi --split val \\
        --out Testing/Benchmarks/ixi_val_pairs.csv

All ordered pairs (fixed != moving) of the split's subjects, or with ``--offsets 1,2,3`` only the
pairs (i, i + offset): each subject is then fixed and moving equally often. Paths are relative to
the CSV.

With ``--stripped DIR`` both images of every pair are skull-stripped copies written to DIR: the T1
set to 0 farther than one voxel (26-neighbourhood) from the subject's own labels, the rule of the
trainer's ``Training/training_data.skull_stripped`` (whose voxel is the training grid's, about 3 mm;
here the image's own, 2 mm for IXI), and stripped before any normalisation, as a real
skull-stripped data set such as OASIS gives both images of a pair.
"""
import argparse
import csv
import os
import sys


def check_same_grid(t1_path, labels_path):
    """Exit with one line unless the two files' headers give the same voxel grid
    (:func:`fmsam.geometry.same_geometry`)."""
    import SimpleITK as sitk

    from fmsam.geometry import same_geometry

    headers = []
    for path in (t1_path, labels_path):
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        headers.append(reader)
    if not same_geometry(*headers):
        raise SystemExit("error: %s is not on the grid of %s" % (labels_path, t1_path))


def write_stripped(t1_path, labels_path, out_path):
    """Write ``t1_path``'s image with every voxel farther than one voxel (3x3x3 cube) from a
    labelled voxel (``labels_path`` > 0, same grid: :func:`check_same_grid` first) set to 0;
    geometry and pixel type kept."""
    import SimpleITK as sitk

    image, labels = sitk.ReadImage(t1_path), sitk.ReadImage(labels_path)
    brain = sitk.BinaryDilate(sitk.Cast(labels > 0, sitk.sitkUInt8), [1, 1, 1], sitk.sitkBox)
    brain.CopyInformation(image)
    sitk.WriteImage(sitk.Mask(image, brain), out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "ixi"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True)
    parser.add_argument("--offsets", default="", help="e.g. 1,2,3: pairs (i, i+offset) only")
    parser.add_argument("--stripped", help="folder for skull-stripped copies of the T1 images, which the "
                                           "pairs then use (both images of a pair stripped)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.data, args.split + ".txt")) as handle:
        subjects = [line.strip() for line in handle if line.strip()]
    base = os.path.dirname(os.path.abspath(args.out))

    def relative(*parts):
        return os.path.relpath(os.path.join(os.path.abspath(args.data), *parts), base)

    if args.offsets:
        count = len(subjects)
        pairs = [(subjects[i], subjects[(i + int(offset)) % count])
                 for offset in args.offsets.split(",") for i in range(count)]
    else:
        pairs = [(f, m) for f in subjects for m in subjects if f != m]
    t1 = {subject: relative("T1", subject + "_T1.nii.gz") for subject in subjects}
    if args.stripped:
        used = sorted({s for pair in pairs for s in pair})
        for subject in used:  # every grid checked before anything is written
            check_same_grid(os.path.join(args.data, "T1", subject + "_T1.nii.gz"),
                            os.path.join(args.data, "labels", subject + "_labels.nii.gz"))
        os.makedirs(args.stripped, exist_ok=True)
        for subject in used:
            out_path = os.path.join(args.stripped, subject + "_T1_stripped.nii.gz")
            write_stripped(os.path.join(args.data, "T1", subject + "_T1.nii.gz"),
                           os.path.join(args.data, "labels", subject + "_labels.nii.gz"), out_path)
            t1[subject] = os.path.relpath(os.path.abspath(out_path), base)
    os.makedirs(base, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for fixed, moving in pairs:
            writer.writerow([t1[fixed], t1[moving],
                             relative("labels", fixed + "_labels.nii.gz"),
                             relative("labels", moving + "_labels.nii.gz")])
    print("wrote %d pairs to %s" % (len(pairs), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
