"""Cache the IXI subjects affinely aligned to one template subject, for training and validation.

Every subject is intensity-normalised with the engine's own normalisation and registered to the
template with the engine's own affine pre-alignment, so random pairs drawn from the cache look like
what the network sees at inference (a moving image affinely resampled onto the fixed grid).

    python Training/prepare_data.py --data ../shared/data/ixi --cache Training/cache [--workers 2]

Writes ``CACHE/<ID>.npz`` (``image`` float16 in [0, 1], ``labels`` uint16, template grid) and
``CACHE/template.json``. Subjects already cached are skipped, so the job can be resumed.
"""
import argparse
import json
import multiprocessing
import os
import sys
import time

# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Logic"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from fmsam.intensity import normalise  # noqa: E402
from fmsam.prealign import affine_prealign  # noqa: E402


def subject_ids(data_dir, split):
    with open(os.path.join(data_dir, split + ".txt")) as handle:
        return [line.strip() for line in handle if line.strip()]


def load_normalised(data_dir, subject):
    image = sitk.ReadImage(os.path.join(data_dir, "T1", subject + "_T1.nii.gz"), sitk.sitkFloat32)
    voxels, _ = normalise(sitk.GetArrayFromImage(image), "mr")
    normalised = sitk.GetImageFromArray(voxels)
    normalised.CopyInformation(image)
    labels = sitk.ReadImage(os.path.join(data_dir, "labels", subject + "_labels.nii.gz"))
    return normalised, labels


def cache_subject(job):
    data_dir, cache_dir, template_id, subject = job
    target = os.path.join(cache_dir, subject + ".npz")
    if os.path.exists(target):
        return subject, 0.0
    start = time.time()
    template, _ = load_normalised(data_dir, template_id)
    image, labels = load_normalised(data_dir, subject)
    if subject == template_id:
        affine = sitk.AffineTransform(3)
    else:
        affine = affine_prealign(template, image)
    aligned = sitk.Resample(image, template, affine, sitk.sitkLinear, 0.0)
    aligned_labels = sitk.Resample(labels, template, affine, sitk.sitkNearestNeighbor, 0)
    partial = target + ".partial.npz"
    np.savez_compressed(partial, image=sitk.GetArrayFromImage(aligned).astype(np.float16),
                        labels=sitk.GetArrayFromImage(aligned_labels).astype(np.uint16))
    os.replace(partial, target)
    return subject, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "ixi"))
    parser.add_argument("--cache", default=os.path.join("Training", "cache"))
    parser.add_argument("--template", default=None, help="template subject (default: first train ID)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    train, val = subject_ids(args.data, "train"), subject_ids(args.data, "val")
    template_id = args.template or train[0]
    with open(os.path.join(args.cache, "template.json"), "w") as handle:
        json.dump({"template": template_id, "train": train, "val": val}, handle, indent=1)
    jobs = [(args.data, args.cache, template_id, s) for s in dict.fromkeys([template_id] + train + val)]
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    with multiprocessing.Pool(args.workers) as pool:
        for done, (subject, seconds) in enumerate(pool.imap_unordered(cache_subject, jobs), 1):
            print("[%d/%d] %s %.1fs" % (done, len(jobs), subject, seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
