"""FMSAMRegistrationLogic: nodes in, nodes out; the same call from the GUI and the Python console.

A run has three parts:

1. read the input nodes into SimpleITK images (main thread; MRML is not thread-safe);
2. run the engine on those images (any thread; touches no node, so it can run in the background
   while Slicer's GUI stays responsive, and can be cancelled between steps);
3. create or fill the output nodes (main thread), only when the engine finished: a failed or
   cancelled run leaves the scene as it was.

The input nodes are only read. Output nodes are new unless the caller passes existing ones.
"""
import json
import threading
import time

import slicer

from fmsam.contrast import CONTRAST_MATCHING
from fmsam.errors import Cancelled, InputError

from . import display, mrml_io
from .torch_support import torch_problem

#: Instance-optimisation steps of the GUI's "Fast" and "Accurate" modes.
MODES = {"fast": 0, "accurate": 50}
DEVICES = ("auto", "cuda", "cpu")
REPORT_ATTRIBUTE = "FMSAMRegistration.Report"

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


class _Request:
    """Everything a run needs, read from the nodes in the main thread."""

    def __init__(self, **values):
        self.__dict__.update(values)


class RegistrationJob:
    """One run. ``run()`` computes in the calling thread; ``start()`` in a background thread, polled
    with ``running`` and collected with ``finish()`` in the main thread."""

    def __init__(self, logic, request):
        self._logic, self._request = logic, request
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self._result, self._error = None, None
        self.stage, self.stageFraction = "prepare", 0.0
        self._stage_started = time.time()

    # -- progress, called by the engine (worker thread) ---------------------------------------
    def _progress(self, stage, fraction):
        with self._lock:
            if stage != self.stage:
                self._stage_started = time.time()
            self.stage, self.stageFraction = stage, fraction
        if self._request.progress is not None:
            self._request.progress(stage, fraction)
        if self._cancel.is_set():
            raise Cancelled("registration cancelled")

    @property
    def fraction(self):
        """Overall progress 0..1 (stage weights are rough; the stage name is the real signal)."""
        weights = dict(STAGE_WEIGHTS)
        if self._request.io_steps:
            weights["instance_optimisation"] = 0.5
        total = sum(weights.values())
        with self._lock:
            stage, fraction = self.stage, self.stageFraction
        done = 0.0
        for name in weights:
            if name == stage:
                return min((done + weights[name] * fraction) / total, 1.0)
            done += weights[name]
        return 1.0

    @property
    def status(self):
        """e.g. 'Affine pre-alignment (4 s)'."""
        with self._lock:
            stage, since = self.stage, self._stage_started
        title = STAGE_TITLES.get(stage, stage)
        if self._cancel.is_set():
            return "Cancelling after: " + title
        return "%s (%d s)" % (title, time.time() - since)

    # -- running ---------------------------------------------------------------------------------
    def _compute(self):
        from fmsam.pipeline import register

        request = self._request
        try:
            self._result = register(
                request.fixed_image, request.moving_image, request.fixed_labels, request.moving_labels,
                prealign=request.prealign, io_steps=request.io_steps, device=request.device,
                modality=request.modality, contrast_matching=request.contrast_matching,
                progress=self._progress, model=request.model)
        except BaseException as error:  # handed to the main thread by finish()
            self._error = error

    def run(self):
        """Compute here and create the output nodes; returns a :class:`RegistrationOutcome`."""
        self._compute()
        return self.finish()

    def start(self):
        self._thread = threading.Thread(target=self._compute, name="FM-SAM registration", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    @property
    def cancelling(self):
        return self._cancel.is_set()

    def cancel(self):
        """Ask the engine to stop at its next step; ``finish()`` then raises :class:`Cancelled`."""
        self._cancel.set()

    def finish(self):
        """Main thread: wait for the engine, then create the output nodes (or re-raise its error)."""
        if self._thread is not None:
            self._thread.join()
        self._logic._job = None
        if self._error is not None:
            raise self._error
        if self._cancel.is_set():
            raise Cancelled("registration cancelled")
        return self._logic.createOutputNodes(self._request, self._result)


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
        """Register ``movingVolumeNode`` to ``fixedVolumeNode``; returns a :class:`RegistrationOutcome`.

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
        * ``showResults`` (True): put the results into the slice views.
        * ``contrastMatching`` ('auto'): give the moving volume the fixed volume's contrast before
          the network: 'auto' (when their contrasts differ), 'on' or 'off'.
        * ``modality`` ('auto'), ``weights`` (bundled model), ``progress(stage, fraction)``.
        """
        return self.prepare(fixedVolumeNode, movingVolumeNode, **options).run()

    def start(self, fixedVolumeNode, movingVolumeNode, **options):
        """Like :meth:`register` but computes in a background thread; returns the running
        :class:`RegistrationJob` (poll ``job.running``, then call ``job.finish()``)."""
        return self.prepare(fixedVolumeNode, movingVolumeNode, **options).start()

    def cancel(self):
        if self._job is not None:
            self._job.cancel()

    # -- part 1: nodes -> request ---------------------------------------------------------------------
    def prepare(self, fixedVolumeNode, movingVolumeNode, fixedSegmentationNode=None,
                movingSegmentationNode=None, prealign=True, device="auto", mode="fast", ioSteps=None,
                outputTransformNode=None, createWarpedVolume=True, warpedVolumeNode=None,
                createJacobian=True, jacobianVolumeNode=None, showResults=True, modality="auto",
                weights=None, progress=None, contrastMatching="auto"):
        """Check the inputs and read them into memory; returns a :class:`RegistrationJob`."""
        if self._job is not None:
            raise InputError("a registration is already running")
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        if device not in DEVICES:
            raise InputError("device must be one of %s, not %r" % (", ".join(DEVICES), device))
        if contrastMatching not in CONTRAST_MATCHING:
            raise InputError("contrastMatching must be one of %s, not %r"
                             % (", ".join(CONTRAST_MATCHING), contrastMatching))
        if ioSteps is None:
            if mode not in MODES:
                raise InputError("mode must be 'fast' or 'accurate', not %r" % mode)
            ioSteps = MODES[mode]
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

        request = _Request(
            fixed_node=fixedVolumeNode, moving_node=movingVolumeNode, fixed_image=fixed_image,
            moving_image=moving_image, fixed_labels=fixed_labels, moving_labels=moving_labels,
            prealign=bool(prealign), device=device, io_steps=int(ioSteps), modality=modality,
            contrast_matching=contrastMatching, model=self._load_model(weights), progress=progress,
            transform_node=outputTransformNode, create_warped=bool(createWarpedVolume) or warpedVolumeNode is not None,
            warped_node=warpedVolumeNode, create_jacobian=bool(createJacobian) or jacobianVolumeNode is not None,
            jacobian_node=jacobianVolumeNode, show_results=bool(showResults))
        self._job = RegistrationJob(self, request)
        return self._job

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

    def _load_model(self, weights):
        from fmsam.weights import load_model

        source = weights or "bundled"
        if self._model is None or self._model_source != source:
            self._model, self._model_source = load_model(weights, "cpu"), source
        return self._model

    # -- part 3: engine result -> nodes -----------------------------------------------------------------
    def addResultToScene(self, fixedVolumeNode, movingVolumeNode, result, showResults=True):
        """Nodes for a result the engine computed elsewhere (e.g. ``fmsam.register`` on files), as a
        GUI run with default outputs would create them."""
        request = _Request(fixed_node=fixedVolumeNode, moving_node=movingVolumeNode, transform_node=None,
                           create_warped=True, warped_node=None, create_jacobian=True, jacobian_node=None,
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
        return RegistrationOutcome(transform_node, warped_node, jacobian_node, dict(result.report))

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
