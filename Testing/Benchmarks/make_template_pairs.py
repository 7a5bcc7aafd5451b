"""Subject-to-template brain pairs: each subject against an average of the others (leave one out).

Registering a subject to a population template (an average brain: smooth, blurred cortex, no one
person's folds) is a common brain task that pairs of individual subjects do not exercise. This
builds such pairs from the IXI cache written by ``Training/prepare_data.py`` (every subject affinely
aligned to one template subject, intensities normalised as the engine normalises them):

* for each subject S of the list, the template is the voxel-wise mean of the *other* subjects'
  aligned images and its label map is their voxel-wise majority vote (label 0 included; ties go to
  the smallest label value), so S is never part of its own template;
* with ``--strip``, the template is skull-stripped: zero outside its own majority brain labels, as
  many published brain templates are distributed (the subject keeps its skull);
* pairs run both ways: (fixed template, moving S's native T1) and (fixed S, moving template), with
  S's own DLMUSE labels; the benchmark's affine pre-alignment puts them together, as for any pair.

The default list is the cache's ``val`` subjects (the selection split of
``Testing/Benchmarks/data_splits.json``), so the set is selection data: their templates are built
from selection subjects only and no training subject enters them.

    python3 Testing/Benchmarks/make_template_pairs.py --cache Training/cache --out out/templates
    python3 Testing/Benchmarks/benchmark.py run --pairs out/templates/pairs.csv --out DIR --methods fmsam-fast

Writes ``OUT/template_without_<ID>.nii.gz``, ``OUT/template_without_<ID>_labels.nii.gz`` (on the
cache's grid: the template subject's native 2 mm grid, LPS as SimpleITK reads it) and
``OUT/pairs.csv`` (paths relative to OUT, as ``benchmark.py`` reads them).
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import SimpleITK as sitk


def majority_vote(label_maps):
    """Voxel-wise most frequent value of ``label_maps`` (N, D, H, W) integers; ties: smallest value.

    Returns (D, H, W) of the input dtype. Memory: one (D, H, W) count and best-count array.
    """
    values = np.unique(label_maps)
    best = np.zeros(label_maps.shape[1:], dtype=label_maps.dtype)
    best_count = np.full(label_maps.shape[1:], -1, dtype=np.int16)
    for value in values:  # ascending, and only a strictly larger count replaces: ties keep the smaller
        count = (label_maps == value).sum(axis=0, dtype=np.int16)
        better = count > best_count
        best[better] = value
        best_count[better] = count[better]
    return best


def leave_one_out_template(images, label_maps, left_out):
    """``(mean image, majority labels)`` of every subject but index ``left_out``.

    ``images``: (N, D, H, W) float; ``label_maps``: (N, D, H, W) integers, same grid.
    """
    keep = [i for i in range(len(images)) if i != left_out]
    return images[keep].astype(np.float32).mean(axis=0), majority_vote(label_maps[keep])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.path.join("Training", "cache"),
                        help="folder written by Training/prepare_data.py")
    parser.add_argument("--ixi", default=os.path.join("..", "shared", "data", "ixi"),
                        help="IXI folder (native T1 and labels of the subjects)")
    parser.add_argument("--split", default="val", help="subject list of the cache's template.json")
    parser.add_argument("--strip", action="store_true",
                        help="skull-strip the templates (zero outside their brain labels)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    with open(os.path.join(args.cache, "template.json")) as handle:
        cache_info = json.load(handle)
    subjects = cache_info[args.split]
    if len(subjects) < 3:
        print("error: a leave-one-out template needs at least 3 subjects, the list has %d"
              % len(subjects), file=sys.stderr)
        return 2
    grid = sitk.ReadImage(os.path.join(args.ixi, "T1", cache_info["template"] + "_T1.nii.gz"))
    images, label_maps = [], []
    for subject in subjects:
        with np.load(os.path.join(args.cache, subject + ".npz")) as data:
            images.append(data["image"])
            label_maps.append(data["labels"])
    images, label_maps = np.stack(images), np.stack(label_maps)
    if images.shape[1:] != grid.GetSize()[::-1]:
        print("error: cache grid %s is not the template subject's %s"
              % (images.shape[1:], grid.GetSize()[::-1]), file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    rows = []
    native = os.path.relpath(os.path.abspath(args.ixi), os.path.abspath(args.out))
    for index, subject in enumerate(subjects):
        mean, labels = leave_one_out_template(images, label_maps, index)
        if args.strip:
            mean = np.where(labels > 0, mean, 0.0).astype(np.float32)
        for array, suffix in ((mean, ""), (labels.astype(np.uint16), "_labels")):
            image = sitk.GetImageFromArray(array)
            image.CopyInformation(grid)
            sitk.WriteImage(image, os.path.join(args.out, "template_without_%s%s.nii.gz"
                                                % (subject, suffix)))
        template = ("template_without_%s.nii.gz" % subject,
                    "template_without_%s_labels.nii.gz" % subject)
        own = (os.path.join(native, "T1", subject + "_T1.nii.gz"),
               os.path.join(native, "labels", subject + "_labels.nii.gz"))
        rows.append((template[0], own[0], template[1], own[1]))
        rows.append((own[0], template[0], own[1], template[1]))
        print("template without %s written" % subject, flush=True)
    with open(os.path.join(args.out, "pairs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("fixed", "moving", "fixed_labels", "moving_labels"))
        writer.writerows(rows)
    print("%d pairs in %s" % (len(rows), os.path.join(args.out, "pairs.csv")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
