"""FMSAMRegistrationLogic: nodes in, nodes out; the same call from the GUI and the Python console.

A run has three parts:

1. read the input nodes into SimpleITK images (main thread; MRML is not thread-safe);
2. run the engine on those images, touching no node: in this process for the console's
   :meth:`FMSAMRegistrationLogic.register` (which blocks, as a console call does), or in a separate
   process for :meth:`FMSAMRegistrationLogic.start` (the GUI: Slicer's main thread holds Python's
   lock while idle, so a thread would crawl; see :mod:`.process`), followed by polling from the main
   thread and cancellable at any moment;
3. create or fill the output nodes (main thread), only when the engine finished: a failed or
   cancelled run leaves the scene as it was.

The input nodes are only read, unless the caller asks for the moving volume to be placed under the
result or hardened (``movingVolumeAction``). Output nodes are new unless the caller passes existing
ones.
"""
import dataclasses
import json
import os
import time
import typing

import SimpleITK as sitk
import slicer

from fmsam.contrast import CONTRAST_MATCHING
from fmsam.errors import Cancelled, InputError

from . import display, mrml_io
from .torch_support import torch_problem

#: Instance-optimisation steps of the GUI's "Fast" and "Accurate" modes.
MODES = {"fast": 0, "accurate": 50}
DEVICES = ("auto", "cuda", "cpu")
#: What happens to the moving volume node: left alone, placed under the result transform (nothing
#: is resampled; undo by removing it from the transform), or hardened (its voxels resampled through
#: the transform, as Slicer's Harden transform does).
MOVING_VOLUME_ACTIONS = ("keep", "transform", "harden")
REPORT_ATTRIBUTE = "FMSAMRegistration.Report"
#: After Cancel, how long the engine process may take to end before the call returns (seconds).
CANCEL_SECONDS = 2.0

STAGE_TITLES = {
    "prepare": "Preparing images", "affine": "Affine pre-alignment", "network": "Running the network",
    "instance_optimisation": "Instance optimisation", "compose": "Composing the transform",
    "warp": "Warping the moving volume", "jacobian": "Jacobian determinant",
}
#: Rough share of a run's time per stage (CPU, fast mode), for one overall progress bar.
STAGE_WEIGHTS = {"prepare": 0.05, "affine": 0.45, "network": 0.2, "instance_optimisation": 0.0,
                 "compose": 0.1, "warp": 0.1, "jacobian": 0.1}


class ProcessingState:
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


class RegistrationOutcome:
    """What a run produced: the output nodes and the figures of the engine's report."""

    def __init__(self, transformNode, warpedVolumeNode, jacobianVolumeNode, report):
        self.transformNode = transformNode
        self.warpedVolumeNode = warpedVolumeNode          # or None
        self.jacobianVolumeNode = jacobianVolumeNode      # or None
        self.report = report                              # dict, as the CLI's report.json

    @property
    def seconds(self):
        return self.report["seconds"]["total"]

    @property
    def device(self):
        return self.report["device"]

    @property
    def foldingPercent(self):
        return self.report["folding_percent"]

    @property
    def jacobianRange(self):
        return self.report["jacobian_min"], self.report["jacobian_max"]

    @property
    def dice(self):
        """``(before, affine, after)`` mean Dice, or ``None`` without segmentations."""
        if "dice_after" not in self.report:
            return None
        return self.report["dice_initial"], self.report["dice_affine"], self.report["dice_after"]

    def summary(self):
        """The results line the module shows."""
        line = "Registered in %.1f s on %s. Folding: %.3f %% of voxels. det J: %.2f to %.2f." % (
            self.seconds, self.device.upper(), self.foldingPercent, *self.jacobianRange)
        if self.dice is not None:
            line += " Mean Dice (%d labels): %.3f before, %.3f affine, %.3f after." % (
                self.report["dice_labels"], *self.dice)
        if self.report.get("contrast_matching", {}).get("applied"):
            line += " Contrast matched: the moving volume was given the fixed volume's contrast."
        for warning in self.report.get("warnings", []):
            line += " Warning: %s." % warning
        return line


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
    weights: typing.Optional[str] = None        # weights file, None: the bundled model
    progress: typing.Optional[typing.Callable[[str, float], None]] = None
    transform_node: typing.Any = None           # output nodes given by the caller, or None
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
    field: typing.Any       # (k, j, i, 3) LPS mm, fixed -> moving
    warped: typing.Any
    jacobian: typing.Any
    report: dict


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
        super().__init__(request.io_steps)
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
                progress=self._progress, model=self._logic.loadModel(request.weights))
        finally:
            self._logic._job = None
        return self._logic.createOutputNodes(request, result)


class BackgroundRegistrationJob(_Progress):
    """One run in a separate engine process, followed from the main thread.

    Call :meth:`poll` (or read :attr:`running`) from a timer; when it is no longer running, call
    :meth:`finish` for the outcome (or the error). :meth:`cancel` ends the process within
    :data:`CANCEL_SECONDS`; the scene is never touched until :meth:`finish` creates the outputs.
    """

    def __init__(self, logic, request):
        super().__init__(request.io_steps)
        self._logic, self._request = logic, request
        self._engine = None
        self.returncode = None
        self.message = ""          # the engine's error line, if any
        self.done = False          # the engine said all result files are written

    def start(self, python=None):
        """Write the inputs and the request into a private folder and start the engine process
        (``python``: the interpreter, default :func:`.process.python_executable`)."""
        from .process import EngineProcess

        request = self._request
        self._engine = EngineProcess()
        try:
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
                "weights": os.path.abspath(request.weights) if request.weights else None, "out": "result"}
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
        self._logic._job = None

    def poll(self):
        """Read the engine's new output (never blocks); returns True while the run goes on."""
        from fmsam import worker

        engine = self._engine
        if engine is None or self.returncode is not None:
            return False
        returncode = engine.returncode  # read before the lines, so no line printed before exit is missed
        for line in engine.poll():
            tag, _, rest = line.partition(" ")
            if tag == worker.PROGRESS:
                stage, fraction = rest.rsplit(" ", 1)
                self._set_progress(stage, float(fraction))
                if self._request.progress is not None and not self._cancelled:
                    try:
                        self._request.progress(self.stage, self.stageFraction)
                    except Cancelled:
                        self.cancel()
            elif tag == worker.ERROR:
                self.message = rest
            elif tag == worker.DONE:
                self.done = True
        if self._cancelled and engine.running:
            engine.kill(timeout=CANCEL_SECONDS)
            returncode = engine.returncode
        if returncode is None:
            return True
        self.returncode = returncode
        return False

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
        engine's error, or :class:`Cancelled`). The temporary folder is removed in every case."""
        try:
            self.wait()
            if self._cancelled:
                raise Cancelled("registration cancelled")
            if self.returncode == 2:
                raise InputError(self.message or "the engine refused the inputs")
            if self.returncode != 0 or not self.done:
                log = "\n".join(self._engine.lines[-20:])
                raise RuntimeError("the registration engine failed (exit code %s): %s\n%s"
                                   % (self.returncode, self.message or "no message", log))
            result = self._read_result()
        finally:
            self._end()
        return self._logic.createOutputNodes(self._request, result)

    def _read_result(self):
        import numpy as np
        from fmsam.worker import RESULT_FILES

        folder = os.path.join(self._engine.folder, "result")

        def image(key):
            return sitk.ReadImage(os.path.join(folder, RESULT_FILES[key]))

        field_image = image("field")
        with open(os.path.join(folder, RESULT_FILES["report"])) as handle:
            report = json.load(handle)
        return EngineResult(fixed=self._request.fixed_image,
                            field=sitk.GetArrayFromImage(field_image).astype(np.float64, copy=False),
                            warped=image("warped"), jacobian=image("jacobian"), report=report)

    def discard(self):
        """Stop the engine and remove its files without creating anything (e.g. module cleanup)."""
        self._cancelled = True
        self._end()


class FMSAMRegistrationLogic:
    """Deformable registration of two volume nodes with the bundled FM-SAM model.

    Typical use from Slicer's Python console::

        logic = FMSAMRegistrationLogic()
        outcome = logic.register(fixedNode, movingNode, mode="accurate")
        print(outcome.summary())
    """

    def __init__(self, scene=None, colorLogic=None):
        self._scene = scene
        self._color_logic = colorLogic
        self._model, self._model_source = None, None
        self._job = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def colorLogic(self):
        if self._color_logic is not None:
            return self._color_logic
        modules = getattr(slicer, "modules", None)  # inside Slicer
        return modules.colors.logic() if modules is not None and hasattr(modules, "colors") else None

    @property
    def state(self):
        if self._job is None:
            return ProcessingState.IDLE
        return ProcessingState.CANCELLING if self._job.cancelling else ProcessingState.RUNNING

    # -- the public calls --------------------------------------------------------------------------
    def register(self, fixedVolumeNode, movingVolumeNode, **options):
        """Register ``movingVolumeNode`` to ``fixedVolumeNode`` here and now (blocks, as a console
        call does); returns a :class:`RegistrationOutcome`.

        Keyword options (all optional):

        * ``fixedSegmentationNode``, ``movingSegmentationNode``: segmentations (segments matched by
          name) or label map volumes, for Dice before/after.
        * ``prealign`` (True): affine pre-alignment.
        * ``device`` ('auto'): 'auto', 'cuda' or 'cpu'.
        * ``mode`` ('fast'): 'fast' or 'accurate' (instance optimisation); ``ioSteps`` overrides it.
        * ``outputTransformNode``: grid transform to fill (default: a new one).
        * ``createWarpedVolume`` (True) / ``warpedVolumeNode``: the moving volume resampled onto the
          fixed grid (a new node unless one is given).
        * ``createJacobian`` (True) / ``jacobianVolumeNode``: det J map with its colour legend.
        * ``movingVolumeAction`` ('keep'): 'keep' the moving volume as it is, place it under the
          result 'transform', or 'harden' the transform on it (its voxels are resampled).
        * ``showResults`` (True): put the results into the slice views.
        * ``contrastMatching`` ('auto'): give the moving volume the fixed volume's contrast before
          the network: 'auto' (when their contrasts differ), 'on' or 'off'.
        * ``modality`` ('auto'), ``weights`` (bundled model), ``progress(stage, fraction)``.
        """
        job = self._own(RegistrationJob(self, self.prepare(fixedVolumeNode, movingVolumeNode, **options)))
        return job.run()

    def start(self, fixedVolumeNode, movingVolumeNode, python=None, **options):
        """Like :meth:`register`, but the engine runs in a separate process (PythonSlicer inside
        Slicer, ``python`` or this interpreter elsewhere) and this returns at once with the running
        :class:`BackgroundRegistrationJob`: poll ``job.running`` from a timer (``progress`` is then
        called from the polling thread), then call ``job.finish()`` for the outcome."""
        request = self.prepare(fixedVolumeNode, movingVolumeNode, **options)
        return self._own(BackgroundRegistrationJob(self, request)).start(python)

    def _own(self, job):
        """The logic runs one job at a time; ``job`` is it until it ends."""
        if self._job is not None:
            raise InputError("a registration is already running")
        self._job = job
        return job

    def cancel(self):
        if self._job is not None:
            self._job.cancel()

    # -- part 1: nodes -> request ---------------------------------------------------------------------
    def prepare(self, fixedVolumeNode, movingVolumeNode, fixedSegmentationNode=None,
                movingSegmentationNode=None, prealign=True, device="auto", mode="fast", ioSteps=None,
                outputTransformNode=None, createWarpedVolume=True, warpedVolumeNode=None,
                createJacobian=True, jacobianVolumeNode=None, showResults=True, modality="auto",
                weights=None, progress=None, contrastMatching="auto", movingVolumeAction="keep"):
        """Check the inputs and read them into memory; returns a :class:`RegistrationRequest`."""
        if self._job is not None:
            raise InputError("a registration is already running")
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        if device not in DEVICES:
            raise InputError("device must be one of %s, not %r" % (", ".join(DEVICES), device))
        if contrastMatching not in CONTRAST_MATCHING:
            raise InputError("contrastMatching must be one of %s, not %r"
                             % (", ".join(CONTRAST_MATCHING), contrastMatching))
        if movingVolumeAction not in MOVING_VOLUME_ACTIONS:
            raise InputError("movingVolumeAction must be one of %s, not %r"
                             % (", ".join(MOVING_VOLUME_ACTIONS), movingVolumeAction))
        parent = movingVolumeNode.GetParentTransformNode()
        if movingVolumeAction != "keep" and parent is not None:
            raise InputError("the moving volume '%s' is already under the transform '%s': harden that "
                             "first, or keep the moving volume as it is" % (movingVolumeNode.GetName(),
                                                                            parent.GetName()))
        if ioSteps is None:
            if mode not in MODES:
                raise InputError("mode must be 'fast' or 'accurate', not %r" % mode)
            ioSteps = MODES[mode]
        if weights is not None and not os.path.isfile(weights):
            raise InputError("weights file not found: %s" % weights)
        problem = torch_problem()
        if problem is not None:
            raise InputError(problem)
        inputs = [node for node in (fixedVolumeNode, movingVolumeNode, fixedSegmentationNode,
                                    movingSegmentationNode) if node is not None]
        self._check_outputs(inputs, outputTransformNode, warpedVolumeNode, jacobianVolumeNode)

        fixed_image = mrml_io.image_from_volume_node(fixedVolumeNode, "fixed volume")
        moving_image = mrml_io.image_from_volume_node(movingVolumeNode, "moving volume")
        if (fixedSegmentationNode is None) != (movingSegmentationNode is None):
            raise InputError("give segmentations for both volumes (or for neither) to get a Dice report")
        fixed_labels = moving_labels = None
        if fixedSegmentationNode is not None:
            values = mrml_io.shared_segment_values(fixedSegmentationNode, movingSegmentationNode)
            fixed_labels = mrml_io.label_image_from_node(
                fixedSegmentationNode, fixedVolumeNode, "fixed segmentation", values, self.scene)
            moving_labels = mrml_io.label_image_from_node(
                movingSegmentationNode, movingVolumeNode, "moving segmentation", values, self.scene)

        return RegistrationRequest(
            fixed_node=fixedVolumeNode, moving_node=movingVolumeNode, fixed_image=fixed_image,
            moving_image=moving_image, fixed_labels=fixed_labels, moving_labels=moving_labels,
            prealign=bool(prealign), device=device, io_steps=int(ioSteps), modality=modality,
            contrast_matching=contrastMatching, weights=weights, progress=progress,
            transform_node=outputTransformNode,
            create_warped=bool(createWarpedVolume) or warpedVolumeNode is not None, warped_node=warpedVolumeNode,
            create_jacobian=bool(createJacobian) or jacobianVolumeNode is not None,
            jacobian_node=jacobianVolumeNode, show_results=bool(showResults),
            moving_volume_action=movingVolumeAction)

    def _check_outputs(self, inputs, transform_node, warped_node, jacobian_node):
        input_ids = {node.GetID() for node in inputs}
        for node, what in ((transform_node, "output transform"), (warped_node, "warped volume"),
                           (jacobian_node, "Jacobian volume")):
            if node is not None and node.GetID() in input_ids:
                raise InputError("the %s '%s' is also an input; pick a new node so the input is kept"
                                 % (what, node.GetName()))
        if transform_node is not None:
            if not transform_node.IsA("vtkMRMLTransformNode") or transform_node.IsA("vtkMRMLLinearTransformNode") \
                    or transform_node.IsA("vtkMRMLBSplineTransformNode"):
                raise InputError("the output transform must be a grid transform node, not a %s"
                                 % transform_node.GetClassName())
            for node in inputs:
                parent = node.GetParentTransformNode()
                while parent is not None:
                    if parent.GetID() == transform_node.GetID():
                        raise InputError("the output transform '%s' is a parent transform of the input "
                                         "'%s'; writing it would move that input" % (
                                             transform_node.GetName(), node.GetName()))
                    parent = parent.GetParentTransformNode()
        for node, what in ((warped_node, "warped volume"), (jacobian_node, "Jacobian volume")):
            if node is not None and (not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode")):
                raise InputError("the %s output must be a scalar volume node" % what)

    def loadModel(self, weights=None):
        """``(network, config)`` for in-process runs, loaded once and kept (imports PyTorch)."""
        from fmsam.weights import load_model

        source = weights or "bundled"
        if self._model is None or self._model_source != source:
            self._model, self._model_source = load_model(weights, "cpu"), source
        return self._model

    # -- part 3: engine result -> nodes -----------------------------------------------------------------
    def addResultToScene(self, fixedVolumeNode, movingVolumeNode, result, showResults=True):
        """Nodes for a result the engine computed elsewhere (e.g. ``fmsam.register`` on files), as a
        GUI run with default outputs would create them."""
        request = RegistrationRequest(fixed_node=fixedVolumeNode, moving_node=movingVolumeNode,
                                      show_results=showResults)
        return self.createOutputNodes(request, result)

    def createOutputNodes(self, request, result):
        """Write an engine result into new (or the given) nodes; all or nothing for new nodes."""
        scene = self.scene
        created = []

        def new_node(class_name, name):
            node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
            created.append(node)
            return node

        fixed_name, moving_name = request.fixed_node.GetName(), request.moving_node.GetName()
        try:
            transform_node = request.transform_node or new_node(
                "vtkMRMLGridTransformNode", "%s to %s (FM-SAM)" % (moving_name, fixed_name))
            mrml_io.set_grid_transform_from_field(transform_node, result.field, result.fixed)
            transform_node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report, sort_keys=True))

            warped_node = None
            if request.create_warped:
                warped_node = request.warped_node or new_node("vtkMRMLScalarVolumeNode", moving_name + " warped")
                mrml_io.set_volume_from_image(warped_node, result.warped)
                if warped_node.GetDisplayNode() is None:
                    warped_node.CreateDefaultDisplayNodes()

            jacobian_node = None
            if request.create_jacobian:
                jacobian_node = request.jacobian_node or new_node(
                    "vtkMRMLScalarVolumeNode", "%s to %s det J" % (moving_name, fixed_name))
                mrml_io.set_volume_from_image(jacobian_node, result.jacobian)
                display.show_jacobian(jacobian_node, self.colorLogic)

            if request.show_results:
                self._show(request, transform_node, warped_node, jacobian_node)
        except BaseException:
            for node in created:
                scene.RemoveNode(node)
            raise
        self._apply_to_moving(request, transform_node)
        return RegistrationOutcome(transform_node, warped_node, jacobian_node, dict(result.report))

    @staticmethod
    def _apply_to_moving(request, transform_node):
        """The ``movingVolumeAction`` the caller chose (the last step: nothing fails after it)."""
        if request.moving_volume_action in ("transform", "harden"):
            request.moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        if request.moving_volume_action == "harden":
            slicer.vtkSlicerTransformLogic.hardenTransform(request.moving_node)

    def _show(self, request, transform_node, warped_node, jacobian_node):
        """Fixed volume under the registered moving one in the slice views; the Jacobian map in the
        green view. Without a warped volume the moving volume is shown through the transform, which
        changes only which transform it is under (its voxels and geometry are kept) and is done
        only when it is under none."""
        scene = self.scene
        moving_shown = warped_node
        if moving_shown is None and request.moving_node.GetParentTransformNode() is None:
            request.moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
            moving_shown = request.moving_node
        views = display.SLICE_VIEWS if jacobian_node is None else display.SLICE_VIEWS[:2]
        display.show_layers(scene, request.fixed_node, moving_shown, 0.5, views)
        if jacobian_node is not None:
            display.show_layers(scene, jacobian_node, None, views=display.SLICE_VIEWS[2:])
