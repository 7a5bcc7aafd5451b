"""The module against Slicer's own Python layer of each supported release (5.6.2, 5.8.1, 5.10.0).

Slicer's ``parameterNodeWrapper``, ``util``, ``i18n`` and ``ScriptedLoadableModule``, unmodified,
run on slicer-core's real MRML (see ``slicer_release.py``): the module file is imported against
them, its parameter node is built by Slicer's decorator, every node-typed parameter is resolved by
Slicer's ``getNodeTypes`` (which instantiates each class, as the GUI binding does), every ``.ui``
binding gets the connector Slicer would create, and the parameter node survives a saved scene.
"""
import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

import slicer_release  # noqa: E402

pytestmark = pytest.mark.skipif(bool(slicer_release.available()), reason=slicer_release.available() or "")

UI_FILE = os.path.join(slicer_release.ROOT, "FMSAMRegistration", "Resources", "UI", "FMSAMRegistration.ui")


@pytest.fixture(params=slicer_release.RELEASES)
def release(request):
    from FMSAMRegistrationLib.scene import new_scene

    headless = new_scene()  # sets slicer.mrmlScene, which Slicer's logic base class uses
    with slicer_release.loaded(request.param) as loaded:
        loaded.headless = headless
        yield loaded


def ui_bindings():
    """``{parameter name: (widget class, node types listed in the .ui or None)}``."""
    bindings = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        properties = {prop.get("name"): prop for prop in widget.findall("property")}
        if "SlicerParameterName" not in properties:
            continue
        node_types = properties.get("nodeTypes")
        listed = tuple(item.text for item in node_types.iter("string")) if node_types is not None else None
        bindings[properties["SlicerParameterName"].find("string").text] = (widget.get("class"), listed)
    return bindings


def node_parameters(release):
    wrapper = release.module.FMSAMRegistrationParameterNode
    return {name: wrapper.dataType(name) for name in wrapper.allParameters
            if release.parameterNodeWrapper.isNodeOrUnionOfNodes(wrapper.dataType(name))}


def test_every_node_parameter_resolves_to_concrete_node_classes(release):
    resolved = {name: release.parameterNodeWrapper.getNodeTypes(datatype)
                for name, datatype in node_parameters(release).items()}
    assert resolved == {
        "fixedVolume": ("vtkMRMLScalarVolumeNode",), "movingVolume": ("vtkMRMLScalarVolumeNode",),
        "fixedSegmentation": ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"),
        "movingSegmentation": ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"),
        "outputTransform": ("vtkMRMLGridTransformNode",), "inverseTransform": ("vtkMRMLGridTransformNode",),
        "warpedVolume": ("vtkMRMLScalarVolumeNode",), "jacobianVolume": ("vtkMRMLScalarVolumeNode",)}


def test_slicer_creates_a_connector_for_every_ui_binding_and_lists_the_ui_types(release):
    wrapper = release.module.FMSAMRegistrationParameterNode
    bindings = ui_bindings()
    assert set(bindings) <= set(wrapper.allParameters)
    for name, (widget_class, listed) in bindings.items():
        package = "slicer" if widget_class.startswith("qMRML") else "ctk" if widget_class.startswith("ctk") else "qt"
        widget = release.placeholder("%s.%s" % (package, widget_class))()
        connector = release.parameterNodeWrapper.createGuiConnector(widget, wrapper.dataType(name))
        assert connector is not None, name
        if widget_class == "qMRMLNodeComboBox":
            # Slicer's connector replaces the .ui's list with the parameter's types: they must agree,
            # or the selector offers nodes the logic refuses (or hides ones it takes).
            assert tuple(widget.nodeTypes) == listed, name


def test_the_logic_takes_every_node_class_a_selector_offers(release):
    """The logic accepts, in its role, a node of each class Slicer's selector lists for a parameter
    (prepare() reads inputs and checks outputs without running anything)."""
    scene = release.headless.scene
    logic = release.module.FMSAMRegistrationLogic()
    types = {name: release.parameterNodeWrapper.getNodeTypes(datatype)
             for name, datatype in node_parameters(release).items()}
    labels = np.zeros((16, 16, 16), dtype=np.int16)
    labels[4:12, 4:12, 4:12] = 1

    def node_of(class_name, name):
        if class_name == "vtkMRMLSegmentationNode":
            source = _volume(scene, name + " source", labelmap=True, voxels=labels)
            node = scene.AddNewNodeByClass(class_name, name)
            assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, node)
            return node
        if class_name == "vtkMRMLGridTransformNode":
            node = scene.AddNewNodeByClass(class_name, name)
            _zero_registration(node)
            return node
        return _volume(scene, name, labelmap=class_name == "vtkMRMLLabelMapVolumeNode",
                       voxels=labels if class_name == "vtkMRMLLabelMapVolumeNode" else None)

    checked = 0
    for fixed_class in types["fixedVolume"]:
        for moving_class in types["movingVolume"]:
            for segmentation_class in types["fixedSegmentation"]:
                assert segmentation_class in types["movingSegmentation"]
                request = logic.prepare(
                    node_of(fixed_class, "fixed"), node_of(moving_class, "moving"),
                    fixedSegmentationNode=node_of(segmentation_class, "fixed segments"),
                    movingSegmentationNode=node_of(segmentation_class, "moving segments"),
                    outputTransformNode=node_of(types["outputTransform"][0], "transform"),
                    inverseTransformNode=node_of(types["inverseTransform"][0], "inverse"),
                    warpedVolumeNode=node_of(types["warpedVolume"][0], "warped"),
                    jacobianVolumeNode=node_of(types["jacobianVolume"][0], "jacobian"))
                assert request.fixed_labels is not None and request.moving_labels is not None
                assert request.create_inverse and request.inverse_transform_node.GetName() == "inverse"
                checked += 1
    assert checked == 2


def _tiny_image():
    import SimpleITK as sitk

    return sitk.Image(2, 2, 2, sitk.sitkFloat32)


def _zero_registration(node):
    """Fill a transform node as a registration result does (identity affine, zero displacements)."""
    import SimpleITK as sitk

    from fmsam.fields import Deformation
    from FMSAMRegistrationLib import mrml_io  # after the release's slicer package is in place

    return mrml_io.set_registration_transform(node, sitk.AffineTransform(3),
                                              Deformation(_tiny_image(), np.zeros((2, 2, 2, 3), np.float32)))


def _volume(scene, name, labelmap=False, voxels=None):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    if voxels is None:
        voxels = np.arange(16 ** 3, dtype=np.int16 if labelmap else np.float32).reshape(16, 16, 16)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.CreateDefaultDisplayNodes()
    return node


def test_parameter_node_defaults_every_field_and_a_saved_scene(release, tmp_path):
    from fmsam.options import DEVICES, MODES
    from FMSAMRegistrationLib import MOVING_VOLUME_ACTIONS
    from FMSAMRegistrationLib.scene import new_scene

    scene = release.headless.scene
    logic = release.module.FMSAMRegistrationLogic()
    parameters = logic.getParameterNode()
    assert (parameters.prealign, parameters.mode, parameters.device, parameters.contrastMatching,
            parameters.createWarpedVolume, parameters.createJacobian, parameters.createInverseTransform,
            parameters.movingVolumeAction) == (True, "fast", "auto", "auto", True, True, False, "keep")
    assert parameters.fixedSegmentation is None and parameters.outputTransform is None

    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "result")
    _zero_registration(grid)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segments")
    segmentation.CreateDefaultDisplayNodes()
    values = {"fixedVolume": _volume(scene, "fixed"), "movingVolume": _volume(scene, "moving"),
              "fixedSegmentation": _volume(scene, "fixed labels", labelmap=True),
              "movingSegmentation": segmentation, "prealign": False, "mode": "accurate",
              "device": "cpu", "contrastMatching": "off", "outputTransform": grid,
              "createWarpedVolume": False, "warpedVolume": _volume(scene, "warped"),
              "createJacobian": False, "jacobianVolume": _volume(scene, "jacobian"),
              "createInverseTransform": True, "inverseTransform": scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "inverse"),
              "movingVolumeAction": "harden"}
    assert set(values) == set(release.module.FMSAMRegistrationParameterNode.allParameters)
    for name, value in values.items():
        setattr(parameters, name, value)
    # The values the widget offers are the ones the logic takes.
    widget = release.module.FMSAMRegistrationWidget
    assert [value for value, _ in widget.MODES] == list(MODES)
    assert sorted(value for value, _ in widget.DEVICES) == sorted(DEVICES)
    assert [value for value, _ in widget.MOVING_VOLUME_ACTIONS] == list(MOVING_VOLUME_ACTIONS)
    # A linear transform is not a grid transform: Slicer's own validation refuses it.
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "linear")
    with pytest.raises(Exception):
        parameters.outputTransform = linear
    assert parameters.outputTransform is grid

    # What Register passes to the logic: the values above, except the nodes of unticked outputs.
    options = release.module.registrationOptions(parameters)
    assert options["inverseTransformNode"] is values["inverseTransform"] and options["createInverseTransform"]
    assert options["warpedVolumeNode"] is None and options["jacobianVolumeNode"] is None
    assert (options["createWarpedVolume"], options["createJacobian"], options["mode"], options["device"]) == (
        False, False, "accurate", "cpu")
    request = logic.prepare(**dict(options, fixedSegmentationNode=None, movingSegmentationNode=None))
    assert request.create_inverse and request.inverse_transform_node is values["inverseTransform"]
    assert not request.create_warped and not request.create_jacobian and request.io_steps == MODES["accurate"]
    parameters.createInverseTransform = False
    assert release.module.registrationOptions(parameters)["inverseTransformNode"] is None
    parameters.createInverseTransform = True

    path = release.headless.write_bundle(str(tmp_path / "parameters.mrb"))
    reread = new_scene()
    reread.read_bundle(path)
    node = reread.scene.GetSingletonNode("FMSAMRegistration", "vtkMRMLScriptedModuleNode")
    assert node is not None
    restored = release.module.FMSAMRegistrationParameterNode(node)
    for name, value in values.items():
        got = getattr(restored, name)
        if hasattr(value, "GetName"):
            assert got is not None and got.GetName() == value.GetName() and got.GetClassName() == value.GetClassName(), name
        else:
            assert got == value, name


class Signal:
    """A Qt signal as Slicer's GUI connectors use it: connect, disconnect, emit."""

    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self):
        for slot in list(self.slots):  # PythonQt passes a slot only the arguments it takes: none here
            slot()


def fake_ui(release):
    """The .ui's bound widgets as placeholders of their real classes, with the signals, properties
    and accessors Slicer's connectors use (the widgets themselves need Qt)."""
    ui = type("ui", (), {})()
    for name, (widget_class, _listed) in ui_bindings().items():
        package = "slicer" if widget_class.startswith("qMRML") else "ctk" if widget_class.startswith("ctk") else "qt"
        widget = release.placeholder("%s.%s" % (package, widget_class))()
        widget.property = lambda key, name=name: name if key == "SlicerParameterName" else None
        widget.stateChanged, widget.toggled, widget.currentNodeChanged = Signal(), Signal(), Signal()
        widget.checked, widget.current = False, None
        widget.currentNode = lambda widget=widget: widget.current
        widget.setCurrentNode = lambda node, widget=widget: setattr(widget, "current", node)
        setattr(ui, name + "Widget", widget)
    return ui


def connected_slots(ui):
    return sum(len(getattr(widget, signal).slots) for widget in vars(ui).values()
               for signal in ("stateChanged", "toggled", "currentNodeChanged"))


def test_the_widget_binds_and_unbinds_the_parameter_node_in_every_release(release):
    """Entering and leaving the module (connect, disconnect) must not pile up bindings: Slicer 5.6
    and 5.8's connectGui returns no tag to disconnect with."""
    logic = release.module.FMSAMRegistrationLogic()
    parameters = logic.getParameterNode()
    ui = fake_ui(release)
    for _cycle in range(3):
        tag = release.module.connectParameterNode(parameters, ui)
        assert tag is not None and connected_slots(ui) == len(ui_bindings())
        assert ui.prealignWidget.checked is True  # the parameter's value reached the widget
        ui.prealignWidget.checked = False
        ui.prealignWidget.stateChanged.emit()
        ui.prealignWidget.toggled.emit()
        assert parameters.prealign is False       # and the widget's back to the parameter
        parameters.prealign = True
        parameters.disconnectGui(tag)
        assert connected_slots(ui) == 0
    ui.prealignWidget.checked = False
    ui.prealignWidget.stateChanged.emit()
    ui.prealignWidget.toggled.emit()
    assert parameters.prealign is True            # an unbound widget writes nothing


def test_the_module_keeps_its_grids_linear_in_scenes_read_after_startup(release, tmp_path):
    """Slicer instantiates the module class at startup with Slicer's ScriptedLoadableModule and
    calls what it connected to ``startupCompleted()``: from then on every scene read into
    ``slicer.mrmlScene`` has the module's grid transforms linear (Slicer's reader makes them cubic).
    What only the application can show: that ``startupCompleted()`` is emitted (Qt)."""
    import types

    from fmsam.fields import Deformation, network_grid
    from FMSAMRegistrationLib import grid_interpolation, mrml_io
    from FMSAMRegistrationLib.scene import new_scene

    connected = {}
    slicer.app.connect = lambda signal, slot: connected.setdefault(signal, slot)
    parent = types.SimpleNamespace(path=release.module.__file__)
    module = release.module.FMSAMRegistration(parent)
    assert parent.title == "FM-SAM Registration" and set(connected) == {"startupCompleted()"}

    def no_sample_data(module_dir):
        raise RuntimeError("Sample Data changed its API")

    release.module.register_sample_data = no_sample_data  # must not keep the grids cubic
    connected["startupCompleted()"]()  # in Slicer: once the application is up

    writer = new_scene()
    fixed = sitk.Image([20, 18, 16], sitk.sitkFloat32)
    grid = network_grid(fixed, (8, 9, 10))
    field = np.zeros((8, 9, 10, 3), np.float32)
    field[..., 0] = 2.0 * np.sin(np.arange(10, dtype=np.float32))  # bends between the grid's nodes
    node = writer.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "registration")
    mrml_io.set_registration_transform(node, None, Deformation(grid, field))
    path = writer.write_bundle(str(tmp_path / "scene.mrb"))
    for scene in (release.headless.scene, writer.scene):
        scene.Clear(0)
    release.headless.scene.ReadFromMRB(path)  # slicer.mrmlScene, which the module's startup observes
    read = release.headless.scene.GetFirstNodeByName("registration")
    grids = grid_interpolation.grid_parts(read.GetTransformFromParent())
    assert [grid.GetInterpolationModeAsString() for grid in grids] == ["Linear"], module
