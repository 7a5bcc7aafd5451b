"""What the slice refinement costs on a stack with more slices than the MyoPS stacks (2-6): the two sample brains
resampled to thick slices (1.5 x 1.5 mm in plane, ``SLICE_MM`` along the axis nearest superior-inferior, blurred as a
thick acquisition is: ``make_unfamiliar.thick``), then the whole ``fmsam register`` in fast mode with
``--slice-refinement off`` and ``auto``, twice each, in turn; prints the report's seconds (total, network stage), the
refinement's planes, folding and the fold removal's voxels. Run it on an idle machine::

    python3 Testing/Benchmarks/stack_timing.py 10

Results: docs/benchmarks.md, "Slice refinement"."""
import json
import os
import subprocess
import sys
import tempfile

import SimpleITK as sitk

from make_unfamiliar import thick

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "Data", "ixi_sample", "T1")


def main():
    slice_mm = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    with tempfile.TemporaryDirectory() as work:
        paths = []
        for name in ("IXI012-HH-1211_T1.nii.gz", "IXI013-HH-1212_T1.nii.gz"):
            stack = thick(sitk.ReadImage(os.path.join(SAMPLE, name)), thickness_mm=slice_mm, in_plane_mm=1.5)
            paths.append(os.path.join(work, name))
            sitk.WriteImage(stack, paths[-1])
            print(name, "->", stack.GetSize(), "voxels")
        for mode in ("off", "auto", "off", "auto"):
            out = os.path.join(work, "out_" + mode)
            subprocess.run([sys.executable, "-m", "fmsam.cli", "register", paths[0], paths[1], "--out", out, "--quiet",
                            "--device", "cpu", "--slice-refinement", mode], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, OMP_NUM_THREADS="2"))
            with open(os.path.join(out, "report.json")) as handle:
                report = json.load(handle)
            print(mode, "total %.2f s, network stage %.2f s, planes %s, folding %.4f %%, unfolded %d" % (
                report["seconds"]["total"], report["seconds"]["network"], report["slice_refinement"].get("planes"),
                report["folding_percent"], report["unfold_voxels"]))


if __name__ == "__main__":
    main()
