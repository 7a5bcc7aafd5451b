"""Writing a registration's outputs to a folder, all or nothing, one run at a time.

* :func:`check_output_folder` refuses an output path that is a file or cannot be written, before
  any work is done.
* Files are written to a hidden staging folder ``.fmsam-partial-<host>-<pid>-<random>`` inside the
  output folder and moved into place only when all succeeded; a run that was killed leaves that
  folder behind, and the next run in the same folder removes it once its process is gone.
* A reused folder never holds a mix of two runs: the previous run's ``report.json`` is removed
  first, then its other known output files that the new run does not write, and the new run's
  files are moved in with ``report.json`` last. A folder with a ``report.json`` holds one
  complete run. Other files in the folder are left alone.
* Identical results give identical bytes: gzip headers carry no time, the overview carries no
  time, and the times HDF5 stores in the transform files are cleared (:mod:`fmsam.hdf5`);
  ``report.json`` differs only in its ``seconds``.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from . import fields
from .errors import InputError, RegistrationError, error_line
from .overview import write_overview
from .processes import process_alive
from .transform_file import write_transform

OUTPUT_NAMES = ("transform.h5", "inverse_transform.h5", "warped.nii.gz", "jacobian.nii.gz", "overview.png", "report.json",
                "warped_labels.nii.gz")
#: Written last and removed first: its presence marks a complete run.
REPORT = "report.json"
PARTIAL_PREFIX = ".fmsam-partial-"
_PARTIAL = re.compile(r"^\.fmsam-partial-([0-9a-f]{8})-(\d+)-")
#: Staging folders of earlier versions (and of Slicer scene bundles) carry no PID: those older than
#: a day, far longer than any write takes, are taken as left by a killed run.
_UNOWNED_PARTIAL = re.compile(r"^\.fmsam-partial-[a-z0-9_]{8}$")
UNOWNED_MAX_AGE_S = 24 * 3600


def _host_tag():
    """8 hex digits naming this machine, so that a folder shared over the network is only cleaned
    up by processes that can tell whether its writer is alive."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def partial_prefix():
    """Name prefix of this process's temporary files and folders: host tag and PID."""
    return "%s%s-%d-" % (PARTIAL_PREFIX, _host_tag(), os.getpid())


def _left_by_a_dead_run(name, path):
    match = _PARTIAL.match(name)
    if match:
        return match.group(1) == _host_tag() and not process_alive(int(match.group(2)))
    if _UNOWNED_PARTIAL.match(name):
        try:
            return time.time() - os.lstat(path).st_mtime > UNOWNED_MAX_AGE_S
        except OSError:
            return False
    return False


def remove_dead_partials(folder):
    """Remove the staging folders and temporary files that runs on this machine which no longer
    exist left in ``folder`` (killed while writing), and PID-less ones of earlier versions older
    than a day. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if not _left_by_a_dead_run(name, path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(name)
    return removed


def _existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_folder(out_dir, what="--out", inputs=()):
    """Raise :class:`InputError` unless ``out_dir`` is a folder, or can be created as one, where
    files can be written, and where writing the outputs replaces none of the ``inputs`` (paths
    the run reads). Creates nothing (a probe file without a name is made and dropped)."""
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise InputError("%s is empty; give a folder" % what)
    for source in (os.fspath(path) for path in inputs if path is not None):
        folder = os.path.dirname(os.path.abspath(source))
        if os.path.basename(source) in OUTPUT_NAMES and os.path.realpath(folder) == os.path.realpath(out_dir):
            raise InputError("%s %s would replace the input %s with this run's output of that name; give "
                             "another folder" % (what, out_dir, os.fspath(source)))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise InputError("%s %s exists and is not a folder; give a folder (it is created if missing)"
                         % (what, out_dir))
    ancestor = _existing_ancestor(out_dir)
    if not os.path.isdir(ancestor):
        raise InputError("%s %s cannot be created: %s is not a folder" % (what, out_dir, ancestor))
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise InputError("%s %s cannot be written: %s (%s)"
                         % (what, out_dir, error.strerror or type(error).__name__, ancestor)) from None


def check_output_file(path, what="--out", inputs=()):
    """Raise :class:`InputError` unless a file can be written at ``path``: not a folder, not one of
    the ``inputs`` (paths the command reads: they are never overwritten), in an existing folder
    where files can be written."""
    path = os.fspath(path)
    for source in inputs:
        if source is not None and os.path.realpath(path) == os.path.realpath(os.fspath(source)):
            raise InputError("%s %s is also an input of this command; give another file name" % (what, path))
    if not path or os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise InputError("%s %r is a folder or empty; give a file name" % (what, path))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError("%s %s cannot be written: its folder %s does not exist" % (what, path, folder))
    check_output_folder(folder, what + " folder")


def _stage(result, staging, moving, overview):
    """Write every output into ``staging``; returns ``{name: path}``."""
    written = {}

    def path_of(name):
        written[name] = os.path.join(staging, name)
        return written[name]

    write_transform(result.transform, path_of("transform.h5"))
    write_transform(result.inverse_transform, path_of("inverse_transform.h5"))
    sitk.WriteImage(result.warped, path_of("warped.nii.gz"), useCompression=True)
    sitk.WriteImage(result.jacobian, path_of("jacobian.nii.gz"), useCompression=True)
    if result.warped_labels is not None:
        sitk.WriteImage(result.warped_labels, path_of("warped_labels.nii.gz"), useCompression=True)
    if overview and moving is not None:
        moving_on_fixed = fields.resample(moving, result.fixed, sitk.Transform())
        write_overview(path_of("overview.png"), result.fixed, moving_on_fixed, result.warped,
                       result.jacobian, result.report)
    with open(path_of(REPORT), "w") as handle:
        json.dump(result.report, handle, indent=2, sort_keys=True, allow_nan=False)  # strict JSON
    return written


def _remove_file(path):
    if os.path.lexists(path):
        os.remove(path)


def _commit(written, out_dir):
    """Move the staged files into ``out_dir``, replacing the previous run's (see the module)."""
    _remove_file(os.path.join(out_dir, REPORT))
    for name in OUTPUT_NAMES:
        if name not in written:
            _remove_file(os.path.join(out_dir, name))
    final = {}
    for name in sorted(written, key=lambda n: n == REPORT):
        final[name] = os.path.join(out_dir, name)
        os.replace(written[name], final[name])
    return final


def write_outputs(result, out_dir, moving=None, overview=True, before_commit=None):
    """Write transform.h5 (fixed -> moving), inverse_transform.h5 (moving -> fixed), warped.nii.gz, jacobian.nii.gz, overview.png, report.json (and
    warped_labels.nii.gz) into ``out_dir`` (see the module for the guarantees). ``before_commit()``
    is called once everything is staged, before anything is moved into place: when it raises,
    nothing is written. Returns ``{name: path}``."""
    out_dir = os.fspath(out_dir)
    check_output_folder(out_dir)
    if not all(np.all(np.isfinite(part.displacement)) for part in (result.deformation, result.inverse_deformation)):
        raise RegistrationError("the result's displacement field is not finite (NaN or infinite "
                                "values); nothing was written to %s" % out_dir)
    created_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_dead_partials(out_dir)
    staging = tempfile.mkdtemp(prefix=partial_prefix(), dir=out_dir)
    try:
        try:
            written = _stage(result, staging, moving, overview)
        except (OSError, RuntimeError) as error:  # a full disk, a quota: SimpleITK raises RuntimeError
            raise RegistrationError("the outputs could not be written to %s (%s); nothing was written"
                                    % (out_dir, error_line(error))) from None
        if before_commit is not None:
            before_commit()
        return _commit(written, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
