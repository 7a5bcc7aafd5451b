"""Does ANTs read ``fmsam register``'s transform files as fmsam means them? (issue 16)

Run with an interpreter that has antspyx (kept out of the project's environment, see
``../shared/docs/baseline-notes.md``), after ``fmsam register FIXED MOVING --out OUT``::

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 ../venv-ants/bin/python Testing/Benchmarks/ants_reads_transform.py \\
        FIXED MOVING OUT

Warps the moving image through ``OUT/transform.h5`` with ``ants.apply_transforms`` (that is,
antsApplyTransforms, which reads ITK composite HDF5 files) and compares it with ``OUT/warped.nii.gz``;
then the fixed image through ``OUT/inverse_transform.h5`` onto the moving grid and back through
``transform.h5``, compared with the fixed image inside its foreground. Prints the figures.
"""
import os
import sys

import ants
import numpy as np


def main(fixed_path, moving_path, out):
    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    forward, inverse = os.path.join(out, "transform.h5"), os.path.join(out, "inverse_transform.h5")
    ours = ants.image_read(os.path.join(out, "warped.nii.gz")).numpy()
    theirs = ants.apply_transforms(fixed, moving, transformlist=[forward], interpolator="linear").numpy()
    print("moving warped by ANTs through transform.h5 vs fmsam's warped.nii.gz: max |difference| %.4g "
          "(image maximum %.1f), correlation %.6f" % (np.abs(theirs - ours).max(), np.abs(ours).max(),
                                                        np.corrcoef(theirs.ravel(), ours.ravel())[0, 1]))
    on_moving = ants.apply_transforms(moving, fixed, transformlist=[inverse], interpolator="linear")
    back = ants.apply_transforms(fixed, on_moving, transformlist=[forward], interpolator="linear").numpy()
    original = fixed.numpy()
    inside = original > np.percentile(original, 60)
    print("fixed -> moving grid (inverse_transform.h5) -> fixed grid (transform.h5), inside the fixed "
          "foreground: correlation with the fixed image %.4f, mean |difference| / mean intensity %.4f"
          % (np.corrcoef(back[inside], original[inside])[0, 1],
             np.abs(back[inside] - original[inside]).mean() / original[inside].mean()))


if __name__ == "__main__":
    main(*sys.argv[1:4])
