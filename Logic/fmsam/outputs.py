"""Writing a registration's outputs to a folder, all or nothing."""
import json
import os
import shutil
import tempfile

import SimpleITK as sitk

from . import fields
from .overview import write_overview

OUTPUT_NAMES = ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "overview.png", "report.json",
                "warped_labels.nii.gz")


def write_outputs(result, out_dir, moving=None, overview=True):
    """Write transform.h5, warped.nii.gz, jacobian.nii.gz, overview.png, report.json (and
    warped_labels.nii.gz) into ``out_dir``. Files are first written to a hidden folder inside
    ``out_dir`` and moved into place only when all succeeded. Returns ``{name: path}``."""
    created_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fmsam-partial-", dir=out_dir)
    try:
        written = {}

        def path_of(name):
            written[name] = os.path.join(staging, name)
            return written[name]

        sitk.WriteTransform(result.transform, path_of("transform.h5"))
        sitk.WriteImage(result.warped, path_of("warped.nii.gz"), useCompression=True)
        sitk.WriteImage(result.jacobian, path_of("jacobian.nii.gz"), useCompression=True)
        if result.warped_labels is not None:
            sitk.WriteImage(result.warped_labels, path_of("warped_labels.nii.gz"), useCompression=True)
        if overview and moving is not None:
            moving_on_fixed = fields.resample(moving, result.fixed, sitk.Transform())
            write_overview(path_of("overview.png"), result.fixed, moving_on_fixed, result.warped,
                           result.jacobian, result.report)
        with open(path_of("report.json"), "w") as handle:
            json.dump(result.report, handle, indent=2, sort_keys=True)
        final = {}
        for name, path in written.items():
            final[name] = os.path.join(out_dir, name)
            os.replace(path, final[name])
        return final
    except BaseException:
        if created_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
