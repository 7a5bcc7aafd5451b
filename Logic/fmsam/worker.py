"""One registration in a process of its own, described by a request file; progress as text lines.

The Slicer module runs the engine this way (in PythonSlicer), so that Slicer's main thread, which
holds Python's lock while it is idle, never slows the registration down, and so that Cancel can end
the run at once. Any program can do the same::

    python -c "import sys; sys.path.insert(0, sys.argv[1]); from fmsam.worker import main; main(sys.argv[2:])" \
        ENGINE_DIR REQUEST.json

``REQUEST.json`` names the input files (any format :func:`fmsam.register` reads) and the options::

    {"fixed": "fixed.mha", "moving": "moving.mha", "fixed_labels": null, "moving_labels": null,
     "prealign": true, "io_steps": 0, "device": "auto", "modality": "auto",
     "contrast_matching": "auto", "slice_refinement": "off", "weights": null,
     "allow_unverified": false, "out": "result", "owner_pid": 1234}

Relative paths are relative to the request file's folder. ``owner_pid`` (optional): the process
the run is for; should it end (a crashed or killed Slicer), the worker removes the request's folder
(which holds the owner's images) and exits at once. Standard output carries one line per
event, each starting with a tag:

* ``FMSAM-PROGRESS <stage> <fraction>``: the stage (as :func:`fmsam.register` names it) and how much
  of it is done (0..1); printed when the stage changes or its fraction grows by 1 % or more;
* ``FMSAM-ERROR <message>``: the run failed (one line; exit code 2 for bad input, 3 for inputs that
  gave no usable result, 1 for anything else, whose traceback precedes the line);
* ``FMSAM-DONE``: every result file is written (exit code 0).

Results, in ``out`` (uncompressed, to be read back at once): ``affine.tfm`` (the affine part,
fixed -> moving, LPS), ``deformation.mha`` and ``inverse_deformation.mha`` (the deformable part and
its inverse on the network grid: LPS millimetres, float32 vectors; see :mod:`fmsam.fields`),
``warped.mha`` (moving image on the fixed grid), ``jacobian.mha`` (det J, float32) and
``report.json`` (as the command line's).
"""
import json
import os
import sys
import traceback

PROGRESS, ERROR, DONE = "FMSAM-PROGRESS", "FMSAM-ERROR", "FMSAM-DONE"
RESULT_FILES = {"affine": "affine.tfm", "deformation": "deformation.mha",
                "inverse_deformation": "inverse_deformation.mha", "warped": "warped.mha",
                "jacobian": "jacobian.mha", "report": "report.json"}
OPTIONS = ("prealign", "io_steps", "device", "modality", "contrast_matching", "slice_refinement", "weights",
           "allow_unverified")
#: Exit codes besides 0 (done).
BAD_INPUT, NO_RESULT, FAILED = 2, 3, 1


def _say(tag, *words):
    print(" ".join([tag] + [str(word) for word in words]), flush=True)


def _progress_printer():
    last = {"stage": None, "fraction": 0.0}

    def progress(stage, fraction):
        if stage != last["stage"] or fraction >= last["fraction"] + 0.01 or (fraction == 1.0 != last["fraction"]):
            last["stage"], last["fraction"] = stage, fraction
            _say(PROGRESS, stage, "%.3f" % fraction)

    return progress


def read_request(path):
    """The request as a dict, with its file paths made absolute. :class:`fmsam.InputError` when the
    file cannot be read or is not a JSON object."""
    from .errors import InputError

    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as handle:
            request = json.load(handle)
    except OSError as error:
        raise InputError("the request file %s cannot be read (%s)" % (path, error.strerror or error)) from None
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise InputError("the request file %s is not JSON (%s)" % (path, error)) from None
    if not isinstance(request, dict):
        raise InputError("the request file %s does not hold a JSON object" % path)
    for key in ("fixed", "moving", "fixed_labels", "moving_labels", "weights", "out"):
        if request.get(key):
            request[key] = os.path.join(folder, request[key])
    return request


#: How often the worker checks that its owner still runs (seconds).
OWNER_CHECK_SECONDS = 1.0


def watch_owner(owner_pid, folder):
    """In a daemon thread: once process ``owner_pid`` is gone, remove ``folder`` and leave."""
    import shutil
    import threading
    import time

    from .processes import process_alive

    def watch():
        while process_alive(owner_pid):
            time.sleep(OWNER_CHECK_SECONDS)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(FAILED)

    threading.Thread(target=watch, name="fmsam-owner-watch", daemon=True).start()


def read_results(out):
    """The results :func:`write_results` wrote, as ``(affine, deformation, inverse_deformation,
    warped, jacobian, report)`` (see the module docstring)."""
    import SimpleITK as sitk

    from .fields import Deformation

    def deformation(key):
        image = sitk.ReadImage(os.path.join(out, RESULT_FILES[key]))
        return Deformation(image, sitk.GetArrayFromImage(image))

    with open(os.path.join(out, RESULT_FILES["report"])) as handle:
        report = json.load(handle)
    affine = sitk.ReadTransform(os.path.join(out, RESULT_FILES["affine"]))
    if isinstance(affine, sitk.CompositeTransform) and affine.GetNumberOfTransforms() == 1:
        affine = affine.GetNthTransform(0)
    return (affine, deformation("deformation"), deformation("inverse_deformation"),
            sitk.ReadImage(os.path.join(out, RESULT_FILES["warped"])),
            sitk.ReadImage(os.path.join(out, RESULT_FILES["jacobian"])), report)


def write_results(result, out):
    """Write the files the module reads back (see the module docstring)."""
    import SimpleITK as sitk

    os.makedirs(out, exist_ok=True)
    from .fields import field_image

    sitk.WriteTransform(result.affine, os.path.join(out, RESULT_FILES["affine"]))
    for key in ("deformation", "inverse_deformation"):
        deformation = getattr(result, key)
        sitk.WriteImage(field_image(deformation.displacement, deformation.grid, sitk.sitkVectorFloat32),
                        os.path.join(out, RESULT_FILES[key]))
    sitk.WriteImage(result.warped, os.path.join(out, RESULT_FILES["warped"]))
    sitk.WriteImage(result.jacobian, os.path.join(out, RESULT_FILES["jacobian"]))
    with open(os.path.join(out, RESULT_FILES["report"]), "w") as handle:
        json.dump(result.report, handle, indent=2, sort_keys=True)


def run(request_path):
    """Run the request; returns the process exit code (0 done, or :data:`BAD_INPUT`,
    :data:`NO_RESULT`, :data:`FAILED`)."""
    from .errors import InputError, RegistrationError
    from .pipeline import register

    try:
        request = read_request(request_path)
        if request.get("owner_pid"):
            watch_owner(int(request["owner_pid"]), os.path.dirname(os.path.abspath(request_path)))
        options = {key: request[key] for key in OPTIONS if key in request}
        result = register(request["fixed"], request["moving"], request.get("fixed_labels"),
                          request.get("moving_labels"), progress=_progress_printer(), **options)
        write_results(result, request["out"])
    except InputError as error:
        _say(ERROR, str(error).replace("\n", " "))
        return BAD_INPUT
    except RegistrationError as error:
        _say(ERROR, str(error).replace("\n", " "))
        return NO_RESULT
    except Exception as error:  # a bug: its traceback goes to the log, one line to the user
        traceback.print_exc(file=sys.stdout)
        _say(ERROR, ("%s: %s" % (type(error).__name__, error)).replace("\n", " "))
        return FAILED
    _say(DONE)
    return 0


def main(argv=None):
    """Entry point: ``argv`` is ``[REQUEST.json]``. Keeps the memory it frees for reuse
    (:func:`fmsam.allocator.keep_freed_memory`) and leaves the process at once when done (its files
    are closed), sparing PyTorch's teardown."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        _say(ERROR, "usage: worker REQUEST.json")
        code = BAD_INPUT
    else:
        from .allocator import keep_freed_memory

        keep_freed_memory()  # this process runs one registration and ends
        code = run(argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
