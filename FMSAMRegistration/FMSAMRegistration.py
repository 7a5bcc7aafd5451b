"""FM-SAM Registration: deformable registration with a uniGradICON-style foundation model.

Module, widget and self-test only. Everything the widget does lives in FMSAMRegistrationLib (no
qt/ctk there, tested on slicer-core's MRML and against Slicer's own Python layer of each supported
release), and the registration in the Slicer-free engine fmsam, which the Register button runs in a
separate PythonSlicer process. Opening the panel does not import PyTorch; Register does.
"""
import logging
import os
from typing import Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from FMSAMRegistrationLib import RegistrationLogic
from FMSAMRegistrationLib import ProcessingState
from FMSAMRegistrationLib.grid_interpolation import keep_linear_on_load
from FMSAMRegistrationLib.sample_data import register_sample_data
from FMSAMRegistrationLib.torch_support import MISSING, cuda_usable, torch_problem

POLL_MILLISECONDS = 200
DOCUMENTATION_URL = "https://github.com/fmsam/SlicerFMSAMRegistration#3d-slicer-module"


class FMSAMRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FM-SAM Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["FMSAMRegistration developers (FMSAMRegistration project)"]
        self.parent.helpText = _(
            "Deformable registration of two volumes with a uniGradICON-style registration foundation "
            "model (its trainer does Sharpness-Aware Minimization, ASAM and, for comparison, Adam; the "
            "bundled model is the best measured, currently an Adam one trained on brain MRI, cardiac MR "
            "stacks and abdominal CT rendered from label maps, with label supervision on brains and "
            "rendered anatomy; on some data classical methods are still "
            "better, and the README says where). "
            "Pick the fixed and moving volumes and click Register: the "
            "result is a grid transform (fixed to moving, as ITK writes it), the moving volume warped "
            "onto the fixed grid, and a Jacobian-determinant map (green = folding). A fixed volume "
            "made of 2 to 32 thick slices (a cardiac short-axis stack) has each slice corrected in plane "
            "after the network (in accurate mode instead of its instance optimisation). The registration "
            "runs in a separate process; Cancel stops it at once. "
            "Documentation: <a href='%s'>README</a>.") % DOCUMENTATION_URL
        self.parent.acknowledgementText = _(
            "Method: Hu et al., Improving Generalization of Medical Image Registration Foundation Model, "
            "IJCNN 2025 (arXiv 2505.06527). Network in the style of uniGradICON. Bundled model trained "
            "on IXI brain MRI (brain-development.org, CC BY-SA 3.0; 2 mm resampling and DLMUSE labels by "
            "CBICA (NiChart), the labels used for label supervision and validation), MyoPS 2020 cardiac MR and "
            "Learn2Reg/BTCV abdominal CT organ label maps (both research use, via DeepReg's demo data).")
        slicer.app.connect("startupCompleted()", self.onStartupCompleted)

    def onStartupCompleted(self):
        """Once the application is up: the module's grid transforms linear again in every scene read
        (Slicer's reader makes them cubic), and the sample pair in the Sample Data module."""
        keep_linear_on_load(slicer.mrmlScene)
        try:
            register_sample_data(os.path.dirname(self.parent.path))
        except Exception:  # the Sample Data module's API is not ours: its failure costs the sample only
            logging.exception("FM-SAM Registration: the sample pair could not be added to Sample Data")


@parameterNodeWrapper
class FMSAMRegistrationParameterNode:
    """The panel's settings, saved with the scene. Node types are the concrete classes the logic
    accepts: Slicer's node selectors list exactly these (an abstract class cannot be listed)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    prealign: bool = True
    mode: str = "fast"
    device: str = "auto"
    contrastMatching: str = "auto"
    outputTransform: vtkMRMLGridTransformNode
    createWarpedVolume: bool = True
    warpedVolume: vtkMRMLScalarVolumeNode
    createJacobian: bool = True
    jacobianVolume: vtkMRMLScalarVolumeNode
    createInverseTransform: bool = False
    inverseTransform: vtkMRMLGridTransformNode
    movingVolumeAction: str = "keep"


def connectParameterNode(parameterNode, ui):
    """Bind every widget of ``ui`` whose ``SlicerParameterName`` property names a parameter (as the
    wrapper's ``connectGui`` does) and return the tag that :meth:`disconnectGui` takes.

    ``connectGui`` itself returns no tag in Slicer 5.6 and 5.8, so disconnecting with it does
    nothing there and every module enter would add another set of bindings;
    ``connectParametersToGui`` returns the tag in every release."""
    mapping = {}
    for widget in vars(ui).values():
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            mapping[name] = widget
    return parameterNode.connectParametersToGui(mapping)


class FMSAMRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """The library's logic with the scripted-module plumbing (parameter node) added."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        RegistrationLogic.__init__(self)

    def getParameterNode(self):
        return FMSAMRegistrationParameterNode(super().getParameterNode())


def registrationOptions(parameters):
    """The logic's ``start``/``register`` keyword arguments for what the panel's parameter node holds.
    A node left in a selector whose box is unticked is not passed (that output is not made)."""
    return dict(
        fixedVolumeNode=parameters.fixedVolume, movingVolumeNode=parameters.movingVolume,
        fixedSegmentationNode=parameters.fixedSegmentation, movingSegmentationNode=parameters.movingSegmentation,
        prealign=parameters.prealign, device=parameters.device, mode=parameters.mode,
        contrastMatching=parameters.contrastMatching, outputTransformNode=parameters.outputTransform,
        createInverseTransform=parameters.createInverseTransform,
        inverseTransformNode=parameters.inverseTransform if parameters.createInverseTransform else None,
        createWarpedVolume=parameters.createWarpedVolume,
        warpedVolumeNode=parameters.warpedVolume if parameters.createWarpedVolume else None,
        createJacobian=parameters.createJacobian,
        jacobianVolumeNode=parameters.jacobianVolume if parameters.createJacobian else None,
        movingVolumeAction=parameters.movingVolumeAction)


class FMSAMRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    MODES = (("fast", _("Fast (network only)")), ("accurate", _("Accurate (+ instance optimisation)")))
    # CUDA is always listed (knowing whether it is usable would import PyTorch when the panel
    # opens); Register falls back to Auto, with a message, where it is not.
    DEVICES = (("auto", _("Auto (CUDA when usable, else CPU)")), ("cuda", _("CUDA (GPU)")), ("cpu", _("CPU")))
    CONTRAST_MATCHING = (("auto", _("Auto (when contrasts differ)")), ("on", _("On")), ("off", _("Off")))
    MOVING_VOLUME_ACTIONS = (("keep", _("Leave as it is")), ("transform", _("Place under the transform")),
                             ("harden", _("Harden the transform (resamples it)")))

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMSAMRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FMSAMRegistrationLogic()

        # Combo boxes whose items carry a value: filled here, synchronised with the parameter node
        # by hand (the parameter node wrapper binds a combo box by its item text).
        self._valueCombos = {"mode": (self.ui.modeComboBox, self.MODES),
                             "device": (self.ui.deviceComboBox, self.DEVICES),
                             "contrastMatching": (self.ui.contrastMatchingComboBox, self.CONTRAST_MATCHING),
                             "movingVolumeAction": (self.ui.movingVolumeActionComboBox, self.MOVING_VOLUME_ACTIONS)}
        for name, (combo, items) in self._valueCombos.items():
            for value, title in items:
                combo.addItem(title, value)
            combo.connect("currentIndexChanged(int)", lambda index, name=name: self._onValueComboChanged(name, index))
        self.ui.progressBar.setVisible(False)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()

    # -- parameter node (the template's pattern) ---------------------------------------------------
    def cleanup(self):
        """Module closed or Slicer quitting: end a running registration (its process and files)."""
        self._stopJob()
        self.removeObservers()

    def _stopJob(self):
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.discard()
            self._job = None
            self.ui.progressBar.setVisible(False)
            self.ui.statusLabel.text = ""

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        self._stopJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = connectParameterNode(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _onValueComboChanged(self, name, index):
        combo = self._valueCombos[name][0]
        if self._parameterNode and index >= 0:
            setattr(self._parameterNode, name, combo.itemData(index))

    def _missing(self):
        """What stops a run, in words ('' when it can run)."""
        parameters = self._parameterNode
        if parameters is None:
            return _("No scene")
        if not parameters.fixedVolume:
            return _("Select a fixed volume")
        if not parameters.movingVolume:
            return _("Select a moving volume")
        if bool(parameters.fixedSegmentation) != bool(parameters.movingSegmentation):
            return _("Select segmentations for both volumes, or for neither")
        return ""

    def _updateGui(self, caller=None, event=None):
        parameters = self._parameterNode
        if parameters is None:
            return
        for name, (combo, _items) in self._valueCombos.items():
            index = combo.findData(getattr(parameters, name))
            if index >= 0 and combo.currentIndex != index:
                combo.currentIndex = index
        self.ui.warpedVolumeSelector.enabled = parameters.createWarpedVolume
        self.ui.jacobianVolumeSelector.enabled = parameters.createJacobian
        self.ui.inverseTransformSelector.enabled = parameters.createInverseTransform
        self._updateButton()

    def _updateButton(self):
        state = self.logic.state if self.logic else ProcessingState.IDLE
        button = self.ui.applyButton
        if state == ProcessingState.RUNNING:
            button.text, button.enabled, button.toolTip = _("Cancel"), True, _("Stop the registration")
        elif state == ProcessingState.CANCELLING:
            button.text, button.enabled, button.toolTip = _("Cancelling..."), False, ""
        else:
            missing = self._missing()
            button.text = _("Register") if not missing else missing
            button.enabled = not missing
            button.toolTip = _("Register the moving volume to the fixed volume") if not missing else missing

    # -- running -------------------------------------------------------------------------------------
    def onApplyButton(self):
        if self._job is not None:
            self._job.cancel()
            self._poll()
            return
        if not self._ensureTorch():
            return
        parameters = self._parameterNode
        if parameters.device == "cuda" and not cuda_usable():
            parameters.device = "auto"
            slicer.util.warningDisplay(_("CUDA is not usable on this computer (no GPU, or PyTorch was built "
                                         "without CUDA). The device is set to Auto, which uses the CPU."))
        self.ui.resultsLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            self._job = self.logic.start(**registrationOptions(parameters))
        if self._job is None:
            return
        self.ui.progressBar.setVisible(True)
        self._timer.start()
        self._poll()

    def _poll(self):
        """Timer tick: read the engine's progress (never blocks); load the results once it ended."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        running = job.poll()
        self.ui.progressBar.value = int(100 * job.fraction)
        self.ui.statusLabel.text = job.status
        self._updateButton()
        if running:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = ""
        from fmsam.errors import Cancelled
        try:
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
                try:
                    outcome = job.finish()
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
                    return
                self.ui.resultsLabel.text = outcome.summary()
                # A failed-looking result (see fmsam.quality) must not read like a good one.
                self.ui.resultsLabel.styleSheet = "color: #d35400" if outcome.report.get("warnings") else ""
                logging.info(outcome.summary())
                # The widget's node selectors pick up the new nodes, so a second run overwrites
                # them only if the user leaves them selected.
                self._parameterNode.outputTransform = None
                self._parameterNode.inverseTransform = None
        finally:
            self._updateButton()

    def _ensureTorch(self):
        """Install PyTorch through the PyTorch extension when it is missing (one confirmation)."""
        problem = torch_problem()
        if problem == MISSING:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("This module needs PyTorch. Install the 'PyTorch' extension "
                                           "from the Extensions Manager, restart Slicer, and try again."))
                return False
            installed = None
            with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
                installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=True, torchVersionRequirement=">=2.0")
            if installed is None:
                return False
            problem = torch_problem()
        if problem is not None:
            slicer.util.errorDisplay(problem)
            return False
        return True


class FMSAMRegistrationTest(ScriptedLoadableModuleTest):
    """Registers the bundled sample pair inside Slicer and checks what a user would see."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        if not self._torchAvailable():
            return
        self.test_RegisterSamplePair()
        self.test_BackgroundRunAndCancel()

    def _torchAvailable(self):
        """PyTorch through the PyTorch extension (installed without asking under testing); without
        it the test is skipped with the reason."""
        problem = torch_problem()
        if problem == MISSING:
            try:
                import PyTorchUtils
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.0")
            except Exception as error:  # no extension, no network: say so and skip
                logging.warning("FMSAMRegistration self-test skipped: PyTorch could not be installed (%s)" % error)
            problem = torch_problem()
        if problem is not None:
            self.delayDisplay("Skipped: PyTorch is not usable here (%s)" % problem)
            logging.warning("FMSAMRegistration self-test skipped: %s" % problem)
            return False
        return True

    def _sampleFile(self, *parts):
        moduleDir = os.path.dirname(slicer.modules.fmsamregistration.path)
        for root in (os.path.join(moduleDir, "Resources", "SampleData"),
                     os.path.join(moduleDir, "..", "Testing", "Data", "ixi_sample")):
            path = os.path.join(root, *parts)
            if os.path.exists(path):
                return path
        raise AssertionError("sample data %s not found beside the module" % os.path.join(*parts))

    def _loadPair(self):
        fixed = slicer.util.loadVolume(self._sampleFile("T1", "IXI012-HH-1211_T1.nii.gz"))
        moving = slicer.util.loadVolume(self._sampleFile("T1", "IXI013-HH-1212_T1.nii.gz"))
        fixedLabels = slicer.util.loadLabelVolume(self._sampleFile("labels", "IXI012-HH-1211_labels.nii.gz"))
        movingLabels = slicer.util.loadLabelVolume(self._sampleFile("labels", "IXI013-HH-1212_labels.nii.gz"))
        return fixed, moving, fixedLabels, movingLabels

    def test_RegisterSamplePair(self):
        import numpy as np

        self.delayDisplay("Loading the sample pair")
        fixed, moving, fixedLabels, movingLabels = self._loadPair()
        movingBefore = slicer.util.arrayFromVolume(moving).copy()

        self.delayDisplay("Registering (console call, in this process)")
        outcome = FMSAMRegistrationLogic().register(fixed, moving, fixedSegmentationNode=fixedLabels,
                                                    movingSegmentationNode=movingLabels)
        self.assertTrue(outcome.transformNode.IsA("vtkMRMLGridTransformNode"))
        self.assertLess(outcome.foldingPercent, 0.1)
        before, affine, after = outcome.dice
        self.assertGreater(after, affine)
        self.assertGreater(affine, before)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        colorNode = outcome.jacobianVolumeNode.GetDisplayNode().GetColorNode()
        self.assertIn("Jacobian", colorNode.GetName())
        self.delayDisplay("Test passed: " + outcome.summary())

    def test_BackgroundRunAndCancel(self):
        """The GUI's way: the engine in a PythonSlicer process, polled by a timer, then cancelled."""
        import time

        from fmsam.errors import Cancelled

        slicer.mrmlScene.Clear()
        fixed, moving, _fixedLabels, _movingLabels = self._loadPair()
        logic = FMSAMRegistrationLogic()
        job = logic.start(fixed, moving)
        while job.poll():
            slicer.app.processEvents()
            time.sleep(0.1)
        outcome = job.finish()
        self.assertLess(outcome.foldingPercent, 0.1)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.start(fixed, moving)
        time.sleep(2.0)
        cancelled = time.time()
        job.cancel()
        self.assertFalse(job.poll())
        self.assertLess(time.time() - cancelled, 2.0)
        with self.assertRaises(Cancelled):
            job.finish()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Background run and cancel passed")
