"""RegistrationLogic: nodes in, nodes out; the same call from the GUI and the Python console.

The module's ``FMSAMRegistrationLogic`` (``slicer.util.getModuleLogic("FMSAMRegistration")``) is this
class with Slicer's scripted-module plumbing (the parameter node) added.

A run has three parts:

1. read the input nodes into SimpleITK images (main thread; MRML is not thread-safe);
2. run the engine on those images, touching no node: in this process for the console's
   :meth:`RegistrationLogic.register` (which blocks, as a console call does), or in a separate
   process for :meth:`RegistrationLogic.start` (the GUI: Slicer's main thread holds Python's
   lock while idle, so a thread would crawl; see :mod:`.process`), followed by polling from the main
   thread and cancellable at any moment;
3. create or fill the output nodes (main thread), only when the engine finished: a failed or
   cancelled run leaves the scene as it was.

The input nodes are only read, unless the caller asks for the moving volume to be placed under the
result or hardened (``movingVolumeAction``). Output nodes are new unless the caller passes existing
ones.
"""
import json
import os

import slicer

from fmsam.errors import InputError
from fmsam.options import CONTRAST_MATCHING, DEFAULT_SLICE_REFINEMENT, DEVICES, MODES, SLICE_REFINEMENT

from . import display, mrml_io
from .jobs import BackgroundRegistrationJob, RegistrationJob, RegistrationRequest
from .torch_support import torch_problem

#: What happens to the moving volume node: left alone, placed under the result transform (nothing
#: is resampled; undo by removing it from the transform), or hardened (its voxels resampled through
#: the transform, as Slicer's Harden transform does).
MOVING_VOLUME_ACTIONS = ("keep", "transform", "harden")
REPORT_ATTRIBUTE = "FMSAMRegistration.Report"


class ProcessingState:
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


class RegistrationOutcome:
    """What a run produced: the output nodes and the figures of the engine's report."""

    def __init__(self, transformNode, warpedVolumeNode, jacobianVolumeNode, report, inverseTransformNode=None):
        self.transformNode = transformNode
        self.inverseTransformNode = inverseTransformNode  # or None
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
        if self.report.get("slice_refinement", {}).get("applied"):
            line += " Slices refined: each fixed slice got its own in-plane correction"
            if self.report.get("io_steps") and self.report.get("io_steps_run") == 0:
                line += " (in place of instance optimisation)"
            line += "."
        for warning in self.report.get("warnings", []):
            line += " Warning: %s." % warning
        return line


class RegistrationLogic:
    """Deformable registration of two volume nodes with the bundled FM-SAM model.

    Typical use from Slicer's Python console::

        logic = RegistrationLogic()
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
        * ``mode`` ('fast'): 'fast' or 'accurate' (instance optimisation; on a stack that slice
          refinement refines, the refinement instead); ``ioSteps`` overrides it.
        * ``outputTransformNode``: grid transform to fill (default: a new one). Its FromParent is the
          fixed-to-moving mapping (the network grid's displacements, then the affine): volumes and
          segmentations' label maps placed under it are resampled without inverting anything.
        * ``createInverseTransform`` (False) / ``inverseTransformNode``: also a transform node whose
          FromParent is the engine's inverse (moving to fixed, computed by the engine, not by
          Slicer): a fixed-space volume or segmentation placed under it lands on the moving image.
          A Slicer transform node holds one direction explicitly and inverts it numerically when
          asked for the other, hence two nodes for two exact directions.
        * ``createWarpedVolume`` (True) / ``warpedVolumeNode``: the moving volume resampled onto the
          fixed grid (a new node unless one is given).
        * ``createJacobian`` (True) / ``jacobianVolumeNode``: det J map with its colour legend.
        * ``movingVolumeAction`` ('keep'): 'keep' the moving volume as it is, place it under the
          result 'transform', or 'harden' the transform on it (its voxels are resampled).
        * ``showResults`` (True): put the results into the slice views.
        * ``contrastMatching`` ('auto'): give the moving volume the fixed volume's contrast before
          the network: 'auto' (when their contrasts differ), 'on' or 'off'.
        * ``sliceRefinement`` (the engine's default, ``fmsam.options.DEFAULT_SLICE_REFINEMENT``):
          'auto' gives each slice of a fixed volume made of 2 to 32 thick slices (a cardiac short-axis
          stack) its own in-plane correction after the network (in accurate mode in place of
          instance optimisation); 'off' never.
        * ``modality`` ('auto'), ``weights`` (bundled model; a file of your own needs its
          ``.sha256`` beside it, or ``allowUnverifiedWeights=True``), ``progress(stage, fraction)``.
        """
        request = self.prepare(fixedVolumeNode, movingVolumeNode, checkTorch=True, **options)
        return self._own(RegistrationJob(self, request)).run()

    def start(self, fixedVolumeNode, movingVolumeNode, python=None, **options):
        """Like :meth:`register`, but the engine runs in a separate process (PythonSlicer inside
        Slicer, ``python`` or this interpreter elsewhere) and this returns at once with the running
        :class:`BackgroundRegistrationJob`: poll ``job.running`` from a timer (``progress`` is then
        called from the polling thread), then call ``job.finish()`` for the outcome. PyTorch is
        not imported here (the engine process imports it; the widget checks it on Register)."""
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
                outputTransformNode=None, createInverseTransform=False, inverseTransformNode=None,
                createWarpedVolume=True, warpedVolumeNode=None,
                createJacobian=True, jacobianVolumeNode=None, showResults=True, modality="auto",
                weights=None, progress=None, contrastMatching="auto", movingVolumeAction="keep",
                allowUnverifiedWeights=False, checkTorch=False, sliceRefinement=DEFAULT_SLICE_REFINEMENT):
        """Check the inputs and read them into memory; returns a :class:`RegistrationRequest`.
        ``checkTorch``: refuse at once when PyTorch is not usable in this process (imports it)."""
        if self._job is not None:
            raise InputError("a registration is already running")
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        if device not in DEVICES:
            raise InputError("device must be one of %s, not %r" % (", ".join(DEVICES), device))
        if contrastMatching not in CONTRAST_MATCHING:
            raise InputError("contrastMatching must be one of %s, not %r"
                             % (", ".join(CONTRAST_MATCHING), contrastMatching))
        if sliceRefinement not in SLICE_REFINEMENT:
            raise InputError("sliceRefinement must be one of %s, not %r"
                             % (", ".join(SLICE_REFINEMENT), sliceRefinement))
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
        problem = torch_problem() if checkTorch else None
        if problem is not None:
            raise InputError(problem)
        inputs = [node for node in (fixedVolumeNode, movingVolumeNode, fixedSegmentationNode,
                                    movingSegmentationNode) if node is not None]
        self._check_outputs(inputs, outputTransformNode, warpedVolumeNode, jacobianVolumeNode)
        if inverseTransformNode is not None:
            self._check_outputs(inputs, inverseTransformNode, None, None)
            if outputTransformNode is not None and inverseTransformNode.GetID() == outputTransformNode.GetID():
                raise InputError("the output transform and the inverse transform are the same node '%s'; pick "
                                 "two nodes (or create new ones)" % inverseTransformNode.GetName())

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
            contrast_matching=contrastMatching, slice_refinement=sliceRefinement, weights=weights,
            allow_unverified=bool(allowUnverifiedWeights), progress=progress,
            transform_node=outputTransformNode,
            create_inverse=bool(createInverseTransform) or inverseTransformNode is not None,
            inverse_transform_node=inverseTransformNode,
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
        if warped_node is not None and jacobian_node is not None and warped_node.GetID() == jacobian_node.GetID():
            raise InputError("the warped volume and the Jacobian volume are the same node '%s'; pick "
                             "two nodes (or create new ones)" % warped_node.GetName())

    def loadModel(self, weights=None, allowUnverified=False):
        """``(network, config)`` for in-process runs, loaded once and kept (imports PyTorch).
        A weights file without a checksum to verify it is refused unless ``allowUnverified``."""
        from fmsam.weights import load_model

        source = (weights or "bundled", bool(allowUnverified))
        if self._model is None or self._model_source != source:
            self._model, self._model_source = load_model(weights, "cpu", allowUnverified), source
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

        for node in (request.fixed_node, request.moving_node, request.transform_node, request.warped_node,
                     request.jacobian_node, request.inverse_transform_node):
            if node is not None and not scene.IsNodePresent(node):
                raise InputError("the node '%s' was removed from the scene while the registration ran; "
                                 "nothing was added" % node.GetName())
        fixed_name, moving_name = request.fixed_node.GetName(), request.moving_node.GetName()
        try:
            transform_node = request.transform_node or new_node(
                "vtkMRMLGridTransformNode", "%s to %s (FM-SAM)" % (moving_name, fixed_name))
            mrml_io.set_registration_transform(transform_node, result.affine, result.deformation)
            transform_node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report, sort_keys=True))
            inverse_node = None
            if request.create_inverse:
                inverse_node = request.inverse_transform_node or new_node(
                    "vtkMRMLGridTransformNode", "%s to %s (FM-SAM)" % (fixed_name, moving_name))
                mrml_io.set_inverse_registration_transform(inverse_node, result.affine, result.inverse_deformation)

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
        return RegistrationOutcome(transform_node, warped_node, jacobian_node, dict(result.report), inverse_node)

    @staticmethod
    def _apply_to_moving(request, transform_node):
        """The ``movingVolumeAction`` the caller chose (the last step: nothing fails after it)."""
        if request.moving_volume_action in ("transform", "harden"):
            request.moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        if request.moving_volume_action == "harden":
            slicer.vtkSlicerTransformLogic.hardenTransform(request.moving_node)

    def _show(self, request, transform_node, warped_node, jacobian_node):
        """Fixed volume under the registered moving one in the slice views (the warped volume, or
        the moving volume when the caller placed it under the transform); the Jacobian map in the
        green view. The moving volume's parent transform is changed only by ``movingVolumeAction``."""
        scene = self.scene
        moving_shown = warped_node
        if moving_shown is None and request.moving_volume_action != "keep":
            moving_shown = request.moving_node
        views = display.SLICE_VIEWS if jacobian_node is None else display.SLICE_VIEWS[:2]
        display.show_layers(scene, request.fixed_node, moving_shown, 0.5, views)
        if jacobian_node is not None:
            display.show_layers(scene, jacobian_node, None, views=display.SLICE_VIEWS[2:])
