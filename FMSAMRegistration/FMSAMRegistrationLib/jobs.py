"""A registration run, from a request read off the nodes to the engine's result: in this process
(:class:`RegistrationJob`, the console's blocking call) or in a separate engine process followed
from the main thread (:class:`BackgroundRegistrationJob`, the Register button; see :mod:`.process`).

Neither touches a node: the logic turns the result into nodes (``createOutputNodes``) on the main
thread, only when the engine finished.
"""
import dataclasses
import json
import os
import time
import typing

import SimpleITK as sitk

from fmsam.errors import Cancelled, InputError, RegistrationError
from fmsam.options import DEFAULT_SLICE_REFINEMENT, STAGE_TITLES

#: After Cancel, how long the engine process may take to end before the call returns (seconds).
CANCEL_SECONDS = 2.0

#: Rough share of a run's time per stage (CPU, fast mode), for one overall progress bar.
STAGE_WEIGHTS = {"prepare": 0.05, "affine": 0.45, "network": 0.2, "instance_optimisation": 0.0,
                 "compose": 0.1, "warp": 0.1, "jacobian": 0.1}


@dataclasses.dataclass
class RegistrationRequest:
    """Everything a run needs, read from the nodes in the main thread."""

    fixed_node: typing.Any                      # vtkMRMLScalarVolumeNode
    moving_node: typing.Any                     # vtkMRMLScalarVolumeNode
    fixed_image: typing.Any = None              # SimpleITK image (LPS, world coordinates)
    moving_image: typing.Any = None
    fixed_labels: typing.Any = None             # SimpleITK label maps or None
    moving_labels: typing.Any = None
    prealign: bool = True
    device: str = "auto"
    io_steps: int = 0
    modality: str = "auto"
    contrast_matching: str = "auto"
    slice_refinement: str = DEFAULT_SLICE_REFINEMENT
    weights: typing.Optional[str] = None        # weights file, None: the bundled model
    allow_unverified: bool = False              # accept a weights file without a checksum to verify
    progress: typing.Optional[typing.Callable[[str, float], None]] = None
    transform_node: typing.Any = None           # output nodes given by the caller, or None
    create_inverse: bool = False               # also a node holding the inverse mapping
    inverse_transform_node: typing.Any = None
    create_warped: bool = True
    warped_node: typing.Any = None
    create_jacobian: bool = True
    jacobian_node: typing.Any = None
    show_results: bool = True
    moving_volume_action: str = "keep"


@dataclasses.dataclass
class EngineResult:
    """The part of the engine's result that becomes nodes (SimpleITK images on the fixed grid)."""

    fixed: typing.Any       # the fixed image's grid
    affine: typing.Any      # SimpleITK transform, LPS, fixed -> moving (the affine part)
    deformation: typing.Any          # fmsam.fields.Deformation: the deformable part, fixed frame
    inverse_deformation: typing.Any  # its inverse on the same grid
    warped: typing.Any
    jacobian: typing.Any
    report: dict


def steps_that_run(request):
    """The instance-optimisation steps the engine will run for ``request`` (none on a stack that
    slice refinement refines instead: :func:`fmsam.slice_refinement.instance_optimisation_steps`)."""
    from fmsam.slice_refinement import instance_optimisation_steps, planes_to_refine

    planes = planes_to_refine(request.fixed_image, request.slice_refinement)
    return instance_optimisation_steps(request.io_steps, planes)


class _Progress:
    """Stage, fraction and status of a run, for one overall progress bar."""

    def __init__(self, io_steps):
        self.stage, self.stageFraction = "prepare", 0.0
        self._stage_started = time.time()
        self._io_steps = io_steps
        self._cancelled = False

    def _set_progress(self, stage, fraction):
        if stage != self.stage:
            self._stage_started = time.time()
        self.stage, self.stageFraction = stage, fraction

    @property
    def fraction(self):
        """Overall progress 0..1 (stage weights are rough; the stage name is the real signal)."""
        weights = dict(STAGE_WEIGHTS)
        if self._io_steps:
            weights["instance_optimisation"] = 0.5
        total = sum(weights.values())
        done = 0.0
        for name in weights:
            if name == self.stage:
                return min((done + weights[name] * self.stageFraction) / total, 1.0)
            done += weights[name]
        return 1.0

    @property
    def status(self):
        """e.g. 'Affine pre-alignment (4 s)'."""
        title = STAGE_TITLES.get(self.stage, self.stage)
        if self._cancelled:
            return "Cancelling after: " + title
        return "%s (%d s)" % (title, time.time() - self._stage_started)

    @property
    def cancelling(self):
        return self._cancelled


class RegistrationJob(_Progress):
    """One run in the calling thread (the console's blocking call): :meth:`run`."""

    def __init__(self, logic, request):
        super().__init__(steps_that_run(request))
        self._logic, self._request = logic, request

    def _progress(self, stage, fraction):
        self._set_progress(stage, fraction)
        if self._request.progress is not None:
            self._request.progress(stage, fraction)
        if self._cancelled:
            raise Cancelled("registration cancelled")

    def cancel(self):
        """Ask the engine to stop at its next step; :meth:`run` then raises :class:`Cancelled`."""
        self._cancelled = True

    def run(self):
        """Compute here and create the output nodes; returns a :class:`RegistrationOutcome`."""
        from fmsam.pipeline import register

        request = self._request
        try:
            result = register(
                request.fixed_image, request.moving_image, request.fixed_labels, request.moving_labels,
                prealign=request.prealign, io_steps=request.io_steps, device=request.device,
                modality=request.modality, contrast_matching=request.contrast_matching,
                slice_refinement=request.slice_refinement, progress=self._progress,
                model=self._logic.loadModel(request.weights, request.allow_unverified))
        finally:
            if self._logic._job is self:
                self._logic._job = None
        return self._logic.createOutputNodes(request, result)


class BackgroundRegistrationJob(_Progress):
    """One run in a separate engine process, followed from the main thread.

    Call :meth:`poll` (or read :attr:`running`) from a timer; when it is no longer running, call
    :meth:`finish` for the outcome (or the error), once. :meth:`cancel` ends the process within
    :data:`CANCEL_SECONDS`; the scene is never touched until :meth:`finish` creates the outputs.
    A ``progress`` callback that raises ends the run too; :meth:`finish` raises its exception.
    """

    def __init__(self, logic, request):
        super().__init__(steps_that_run(request))
        self._logic, self._request = logic, request
        self._engine = None
        self._callback_error = None
        self._finished = False
        self.returncode = None
        self.message = ""          # the engine's error line, if any
        self.done = False          # the engine said all result files are written

    def start(self, python=None):
        """Write the inputs and the request into a private folder and start the engine process
        (``python``: the interpreter, default :func:`.process.python_executable`). The engine ends
        itself, removing the folder, if this process dies (``owner_pid``)."""
        from .process import EngineProcess, remove_abandoned_folders

        request = self._request
        try:
            remove_abandoned_folders()
            self._engine = EngineProcess()
            folder = self._engine.folder
            files = {}
            for key in ("fixed_image", "moving_image", "fixed_labels", "moving_labels"):
                image = getattr(request, key)
                if image is not None:
                    files[key] = key + ".mha"
                    sitk.WriteImage(image, os.path.join(folder, files[key]))
            description = {
                "fixed": files["fixed_image"], "moving": files["moving_image"],
                "fixed_labels": files.get("fixed_labels"), "moving_labels": files.get("moving_labels"),
                "prealign": request.prealign, "io_steps": request.io_steps, "device": request.device,
                "modality": request.modality, "contrast_matching": request.contrast_matching,
                "slice_refinement": request.slice_refinement,
                "weights": os.path.abspath(request.weights) if request.weights else None,
                "allow_unverified": request.allow_unverified, "out": "result", "owner_pid": os.getpid()}
            request_path = os.path.join(folder, "request.json")
            with open(request_path, "w") as handle:
                json.dump(description, handle, indent=2)
            self._engine.start(request_path, python)
        except BaseException:
            self._end()
            raise
        return self

    def _end(self):
        if self._engine is not None:
            self._engine.discard()
        if self._logic._job is self:
            self._logic._job = None

    def poll(self):
        """Read the engine's new output (never blocks); returns True while the run goes on."""
        engine = self._engine
        if engine is None or self.returncode is not None:
            return False
        returncode = engine.returncode  # read before the lines, so no line printed before exit is missed
        for line in engine.poll():
            self._read_line(line)
        if self._cancelled and engine.running:
            engine.kill(timeout=CANCEL_SECONDS)
            returncode = engine.returncode
        if returncode is None:
            return True
        self.returncode = returncode
        return False

    def _read_line(self, line):
        """One line of the engine's output: progress, its error line or its end (see fmsam.worker);
        anything else (a traceback, warnings) is kept in the log only."""
        from fmsam import worker

        tag, _, rest = line.partition(" ")
        if tag == worker.ERROR:
            self.message = rest
        elif tag == worker.DONE:
            self.done = True
        elif tag == worker.PROGRESS:
            stage, _, fraction = rest.rpartition(" ")
            try:
                self._set_progress(stage, float(fraction))
            except ValueError:
                return
            if self._request.progress is not None and not self._cancelled:
                try:
                    self._request.progress(self.stage, self.stageFraction)
                except Cancelled:
                    self.cancel()
                except Exception as error:  # the caller's own bug: end the run, finish() raises it
                    self._callback_error = error
                    self.cancel()

    @property
    def running(self):
        return self.poll()

    def cancel(self):
        """End the engine process (now); :meth:`finish` then raises :class:`Cancelled`."""
        if not self._cancelled:
            self._cancelled = True
            if self._engine is not None:
                self._engine.kill(timeout=CANCEL_SECONDS)

    def wait(self, poll_seconds=0.1):
        """Block until the engine ends (scripts; the GUI polls instead)."""
        while self.poll():
            time.sleep(poll_seconds)

    def finish(self):
        """Main thread, once :attr:`running` is False: create the output nodes (or raise the
        engine's error, or :class:`Cancelled`). The temporary folder is removed in every case.
        Call it once: a second call raises ``RuntimeError``."""
        if self._finished:
            raise RuntimeError("this registration has already finished")
        self._finished = True
        try:
            self.wait()
            if self._callback_error is not None:
                raise self._callback_error
            if self._cancelled:
                raise Cancelled("registration cancelled")
            from fmsam import worker

            if self.returncode == worker.BAD_INPUT:
                raise InputError(self.message or "the engine refused the inputs")
            if self.returncode == worker.NO_RESULT:
                raise RegistrationError(self.message or "the registration gave no usable result")
            if self.returncode != 0 or not self.done:
                log = "\n".join(self._engine.lines[-20:])
                raise RuntimeError("the registration engine failed (exit code %s): %s\n%s"
                                   % (self.returncode, self.message or "no message", log))
            result = self._read_result()
        finally:
            self._end()
        return self._logic.createOutputNodes(self._request, result)

    def _read_result(self):
        from fmsam.worker import read_results

        affine, deformation, inverse, warped, jacobian, report = read_results(
            os.path.join(self._engine.folder, "result"))
        return EngineResult(fixed=self._request.fixed_image, affine=affine, deformation=deformation,
                            inverse_deformation=inverse, warped=warped, jacobian=jacobian, report=report)

    def discard(self):
        """Stop the engine and remove its files without creating anything (e.g. module cleanup)."""
        self._cancelled = True
        self._finished = True
        self._end()
