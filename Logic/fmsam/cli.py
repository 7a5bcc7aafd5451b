"""The ``fmsam`` command line: register, warp, jacobian, evaluate.

Problems with the inputs exit with code 2 and a one-line ``fmsam: error: ...`` message, a result
that cannot be used or written (e.g. a non-finite field) with code 1 and such a line; neither leaves
partial outputs behind.
"""
import argparse
import os
import sys

from .errors import InputError, RegistrationError
from .options import (CONTRAST_MATCHING, DEFAULT_SLICE_REFINEMENT, DEVICES, MAX_IO_STEPS, MODALITIES, MODES,
                      SLICE_REFINEMENT)


def _add_register(commands):
    parser = commands.add_parser("register", help="register MOVING to FIXED and write all outputs")
    parser.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA)")
    parser.add_argument("moving", help="moving image")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--fixed-labels", help="label map on the fixed grid (for Dice)")
    parser.add_argument("--moving-labels", help="label map on the moving grid (warped, for Dice)")
    _add_device_and_mode(parser)
    _add_weights(parser)
    parser.add_argument("--no-affine", action="store_true", help="skip affine pre-alignment")
    parser.add_argument("--modality", choices=MODALITIES, default="auto",
                        help="intensity normalisation (default: detected per image)")
    _add_contrast_matching(parser)
    _add_slice_refinement(parser)
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    parser.add_argument("--scene", metavar="OUT.mrb",
                        help="also write a Slicer scene bundle (inputs, transform, warped volume, "
                        "Jacobian map with its colours); needs slicer-core or Slicer's Python")


def _add_device_and_mode(parser):
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--mode", choices=tuple(MODES), default="fast",
                        help="fast: the network alone; accurate: + %d instance-optimisation steps (on a "
                        "thick-slice stack that slice refinement refines: the refinement instead)"
                        % MODES["accurate"])
    parser.add_argument("--io-steps", type=int, default=None,
                        help="instance-optimisation steps, 0 (off) to %d; overrides --mode (none run on a "
                        "stack that slice refinement refines)" % MAX_IO_STEPS)


def io_steps(args):
    """The instance-optimisation steps asked for: ``--io-steps`` if given, else ``--mode``'s."""
    return args.io_steps if args.io_steps is not None else MODES[args.mode]


def _add_weights(parser):
    parser.add_argument("--weights", help="weights file (default: the bundled model); its SHA-256 is "
                        "checked against FILE.sha256")
    parser.add_argument("--allow-unverified-weights", action="store_true",
                        help="use a weights file that has no FILE.sha256 (its checksum cannot be "
                        "verified); refused without this option")


def _add_slice_refinement(parser):
    parser.add_argument("--slice-refinement", choices=SLICE_REFINEMENT, default=DEFAULT_SLICE_REFINEMENT,
                        help="auto: give each slice of a thick-slice stack (cardiac short axis, 2 to 32 "
                        "slices) its own in-plane correction after the network, when the fixed image is "
                        "such a stack (in accurate mode in place of instance optimisation); default %s"
                        % DEFAULT_SLICE_REFINEMENT)


def _add_contrast_matching(parser):
    parser.add_argument("--contrast-matching", choices=CONTRAST_MATCHING, default="auto",
                        help="give the moving image the fixed image's contrast before the network "
                        "(auto: when their contrasts differ)")


def _add_warp(commands):
    parser = commands.add_parser("warp", help="resample an image through a transform.h5")
    parser.add_argument("image")
    parser.add_argument("--transform", required=True)
    parser.add_argument("--reference", required=True, help="image giving the output grid (fixed)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--nearest", action="store_true", help="nearest neighbour (label maps)")


def _add_jacobian(commands):
    parser = commands.add_parser("jacobian", help="Jacobian determinant map of a transform.h5")
    parser.add_argument("transform")
    parser.add_argument("--reference", help="image whose grid the map is computed on (default: the grid "
                        "of the transform's displacement field; give the fixed image for fmsam's "
                        "transform.h5, whose field lies on the coarser network grid)")
    parser.add_argument("--out", required=True)


def _add_evaluate(commands):
    parser = commands.add_parser("evaluate", help="register every pair of a CSV and report Dice, "
                                 "folding and seconds")
    parser.add_argument("--pairs", required=True,
                        help="CSV with columns fixed, moving, fixed_labels, moving_labels")
    parser.add_argument("--out", required=True, help="results CSV")
    _add_device_and_mode(parser)
    _add_weights(parser)
    parser.add_argument("--no-affine", action="store_true")
    _add_contrast_matching(parser)
    _add_slice_refinement(parser)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other error: one line, exit code 2."""

    def error(self, message):
        self.exit(2, "fmsam: error: %s (see %s --help)\n" % (message, self.prog))


def build_parser():
    parser = _Parser(prog="fmsam", description="FM-SAM deformable registration "
                     "with a uniGradICON-style registration foundation model.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_register, _add_warp, _add_jacobian, _add_evaluate):
        add(commands)
    return parser


def _progress_printer(quiet):
    state = {"stage": None}

    def progress(stage, fraction):
        if quiet or stage == state["stage"]:
            return
        state["stage"] = stage
        print("  %s ..." % stage.replace("_", " "), flush=True)

    return progress


#: Entry-point group of the ``--scene`` writer. The engine knows no Slicer code: the Slicer module's
#: library offers itself here (``pyproject.toml``), so the import arrow points from the module down
#: to the engine, never back up.
SCENE_EXPORT_GROUP = "fmsam.scene_export"


def _entry_points(group):
    from importlib import metadata

    found = metadata.entry_points()
    return list(found.select(group=group)) if hasattr(found, "select") else list(found.get(group, []))


def _scene_export():
    """The installed ``--scene`` writer: a module with ``check_scene_path(path)`` and
    ``write_registration_scene(path, result, fixed, moving, fixed_labels, moving_labels)``."""
    points = _entry_points(SCENE_EXPORT_GROUP)
    if not points:
        raise InputError("--scene needs the FMSAMRegistration module's library installed with the "
                         "engine (pip install -e '.[slicer]' from the extension's source)")
    try:
        return points[0].load()
    except ImportError as error:
        raise InputError("--scene needs Slicer's MRML classes in Python (pip install slicer-core on "
                         "Python 3.10+, or run fmsam from Slicer's Python): %s" % error) from None


def _check_scene(path):
    """Everything ``--scene`` needs, checked before any work: Slicer's MRML and a writable path."""
    from .outputs import check_output_file

    _scene_export().check_scene_path(path)
    check_output_file(path, "--scene")


class _SceneWriter:
    """Writes the ``--scene`` bundle into a hidden staging folder beside it (the bundle keeps its
    final name: Slicer names the scene after the file), moved into place by :meth:`commit` once the
    other outputs are in place; any failure becomes a :class:`RegistrationError`."""

    def __init__(self, args, result):
        self.args, self.result, self.staging = args, result, None

    def stage(self):
        import tempfile

        from .outputs import partial_prefix, remove_dead_partials

        folder = os.path.dirname(os.path.abspath(self.args.scene))
        remove_dead_partials(folder)
        self.staging = tempfile.mkdtemp(prefix=partial_prefix(), dir=folder)
        staged = os.path.join(self.staging, os.path.basename(self.args.scene))
        try:
            _scene_export().write_registration_scene(staged, self.result, self.args.fixed, self.args.moving,
                                                     self.args.fixed_labels, self.args.moving_labels)
        except Exception as error:  # MRML and its writers raise many kinds
            from .errors import error_line

            raise RegistrationError("the scene %s could not be written (%s); no output was written"
                                    % (self.args.scene, error_line(error))) from None

    def commit(self):
        try:
            os.replace(os.path.join(self.staging, os.path.basename(self.args.scene)), self.args.scene)
        except OSError as error:
            raise RegistrationError("the outputs are in %s, but the scene could not be moved to %s (%s)"
                                    % (self.args.out, self.args.scene, error.strerror or error)) from None

    def discard(self):
        if self.staging is not None:
            import shutil

            shutil.rmtree(self.staging, ignore_errors=True)


def _register(args):
    from .imageio import read_image
    from .outputs import check_output_folder, write_outputs
    from .pipeline import register

    check_output_folder(args.out, inputs=(args.fixed, args.moving, args.fixed_labels, args.moving_labels))
    if args.scene:
        _check_scene(args.scene)
    result = register(args.fixed, args.moving, args.fixed_labels, args.moving_labels,
                      prealign=not args.no_affine, io_steps=io_steps(args), device=args.device,
                      weights=args.weights, modality=args.modality,
                      contrast_matching=args.contrast_matching,
                      allow_unverified=args.allow_unverified_weights,
                      progress=_progress_printer(args.quiet), slice_refinement=args.slice_refinement)
    scene = _SceneWriter(args, result) if args.scene else None
    try:
        write_outputs(result, args.out, moving=read_image(args.moving),
                      before_commit=scene.stage if scene else None)
        if scene:
            scene.commit()
    finally:
        if scene:
            scene.discard()
    report = result.report
    line = "registered in %.1f s on %s; folding %.4f %%; det J %.3f..%.3f" % (
        report["seconds"]["total"], report["device"], report["folding_percent"],
        report["jacobian_min"], report["jacobian_max"])
    if "dice_after" in report:
        line += "; Dice affine %.3f -> %.3f" % (report["dice_affine"], report["dice_after"])
    if report["contrast_matching"]["applied"]:
        line += "; contrast matched"
    if report["slice_refinement"]["applied"]:
        line += "; slices refined"
        if report["io_steps"] and report["io_steps_run"] == 0:
            line += " in place of instance optimisation"
    print(line + "; outputs in %s" % args.out)
    for warning in report.get("warnings", []):
        print("fmsam: warning: %s" % warning, file=sys.stderr)


def _warp(args):
    import SimpleITK as sitk

    from .fields import resample
    from .imageio import read_image, read_registration_transform, write_atomically
    from .outputs import check_output_file

    check_output_file(args.out, inputs=(args.image, args.reference, args.transform))
    image = read_image(args.image, "image")
    reference = read_image(args.reference, "reference image")
    transform, _ = read_registration_transform(args.transform)
    warped = resample(image, reference, transform, nearest=args.nearest)
    write_atomically(lambda path: sitk.WriteImage(warped, path, useCompression=True), args.out)


def _jacobian(args):
    import numpy as np
    import SimpleITK as sitk

    from .fields import image_on_grid
    from .imageio import read_image, read_registration_transform, write_atomically
    from .jacobian import jacobian_statistics, transform_jacobian
    from .outputs import check_output_file

    check_output_file(args.out, inputs=(args.transform, args.reference))
    transform, reference = read_registration_transform(args.transform)
    if args.reference is not None:
        reference = read_image(args.reference, "reference image")
    elif reference is None:
        raise InputError("transform %s holds no displacement field; give --reference (the fixed image)"
                         % args.transform)
    determinant = transform_jacobian(transform, reference)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused here
        values = determinant.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise InputError("transform %s has displacements too large for a finite Jacobian determinant"
                         % args.transform)
    image = image_on_grid(values, reference)
    write_atomically(lambda path: sitk.WriteImage(image, path, useCompression=True), args.out)
    stats = jacobian_statistics(determinant)
    print("folding %.4f %%; det J %.3f..%.3f; std log|J| %.4f" % (
        stats["folding_percent"], stats["jacobian_min"], stats["jacobian_max"],
        stats["log_jacobian_std"]))


def _evaluate(args):
    from .evaluate import evaluate_pairs

    evaluate_pairs(args.pairs, args.out, device=args.device, io_steps=io_steps(args),
                   weights=args.weights, prealign=not args.no_affine,
                   contrast_matching=args.contrast_matching, slice_refinement=args.slice_refinement,
                   allow_unverified=args.allow_unverified_weights)


def main(argv=None):
    args = build_parser().parse_args(argv)
    handlers = {"register": _register, "warp": _warp, "jacobian": _jacobian, "evaluate": _evaluate}
    try:
        handlers[args.command](args)
    except InputError as error:
        print("fmsam: error: %s" % error, file=sys.stderr)
        return 2
    except RegistrationError as error:
        print("fmsam: error: %s" % error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fmsam: interrupted", file=sys.stderr)
        return 130
    return 0


def run_and_exit(argv=None):
    """The ``fmsam`` command: :func:`main`, then leave the process at once.

    Every output file is written and closed when ``main`` returns; what the interpreter would still
    do is tear down PyTorch (0.3-0.4 s of a 4 s command on two cores, measured while matplotlib was
    loaded too). For the same reason ``fmsam register`` keeps memory it frees for reuse
    (:func:`fmsam.allocator.keep_freed_memory`; not ``evaluate``, which registers many pairs).
    Programs that call ``main`` themselves (tests, Slicer) keep a normal interpreter and their own
    memory policy.
    """
    from .allocator import keep_freed_memory

    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["register"]:  # one registration, then the process ends
        keep_freed_memory()
    code = main(arguments)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
