"""The Slicer module's files, checked without Slicer: UI, CMake lists, catalog entry, torch handling."""
import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import ROOT

MODULE_DIR = os.path.join(ROOT, "FMSAMRegistration")
MODULE_FILE = os.path.join(MODULE_DIR, "FMSAMRegistration.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "FMSAMRegistration.ui")


def files_under(folder, relative_to):
    found = set()
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        found.update(os.path.relpath(os.path.join(directory, name), relative_to).replace(os.sep, "/")
                     for name in names if not name.endswith(".pyc"))
    return found


def cmake_list(text, name):
    match = re.search(r"set\(%s\n(.*?)\n\s*\)" % name, text, flags=re.S)
    assert match, "%s not set in the module CMakeLists.txt" % name
    return {line.strip().replace("${MODULE_NAME}", "FMSAMRegistration")
            for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")}


@pytest.fixture(scope="module")
def module_cmake():
    with open(os.path.join(MODULE_DIR, "CMakeLists.txt")) as handle:
        return handle.read()


@pytest.fixture(scope="module")
def ui_widgets():
    tree = ElementTree.parse(UI_FILE)
    return {widget.get("name"): widget for widget in tree.iter("widget")}


def test_ui_has_every_widget_the_module_uses(ui_widgets):
    with open(MODULE_FILE) as handle:
        used = set(re.findall(r"self\.ui\.(\w+)", handle.read()))
    assert {"applyButton", "progressBar", "statusLabel", "resultsLabel", "modeComboBox", "deviceComboBox"} <= used
    assert used <= set(ui_widgets), "missing in the .ui: %s" % sorted(used - set(ui_widgets))
    # Node selectors and check boxes are bound through the parameter node instead.
    for name, widget in ui_widgets.items():
        if widget.get("class") in ("qMRMLNodeComboBox", "QCheckBox"):
            assert any(prop.get("name") == "SlicerParameterName" for prop in widget.findall("property")), name


def parameter_node_fields():
    tree = ast.parse(open(MODULE_FILE).read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "FMSAMRegistrationParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no parameter node class in the module")


def test_ui_parameter_bindings_are_parameter_node_fields(ui_widgets):
    bound = {}
    for name, widget in ui_widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = name
    fields = parameter_node_fields()
    assert set(bound) <= fields
    # Only the combo boxes with item data are synchronised by hand in the widget.
    assert fields - set(bound) == {"mode", "device", "contrastMatching", "movingVolumeAction"}


def test_module_cmake_lists_every_file_the_module_loads(module_cmake):
    scripts = cmake_list(module_cmake, "MODULE_PYTHON_SCRIPTS")
    expected_scripts = {"FMSAMRegistration.py"} | {
        path for path in files_under(os.path.join(MODULE_DIR, "FMSAMRegistrationLib"), MODULE_DIR)}
    assert scripts == expected_scripts
    resources = cmake_list(module_cmake, "MODULE_PYTHON_RESOURCES")
    assert resources == files_under(os.path.join(MODULE_DIR, "Resources"), MODULE_DIR)
    engine = cmake_list(module_cmake, "ENGINE_FILES")
    assert engine == files_under(os.path.join(ROOT, "Logic", "fmsam"), os.path.join(ROOT, "Logic"))
    samples = cmake_list(module_cmake, "SAMPLE_FILES")
    sample_root = os.path.join(ROOT, "Testing", "Data", "ixi_sample")
    assert all(os.path.isfile(os.path.join(sample_root, path)) for path in samples)
    # The self-test loads exactly these sample files.
    used = set(re.findall(r'_sampleFile\("(\w+)", "([\w.-]+)"\)', open(MODULE_FILE).read()))
    assert {"%s/%s" % pair for pair in used} <= samples
    assert "slicerMacroBuildScriptedModule" in module_cmake and "slicer_add_python_unittest" in module_cmake


def test_extension_metadata_agrees_everywhere():
    with open(os.path.join(ROOT, "FMSAMRegistration.json")) as handle:
        entry = json.load(handle)
    assert entry["category"] == "Registration" and entry["scm_url"].startswith("https://")
    assert entry["build_dependencies"] == ["PyTorch"]
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert 'set(EXTENSION_CATEGORY "%s")' % entry["category"] in cmake
    assert 'set(EXTENSION_DEPENDS "%s")' % " ".join(entry["build_dependencies"]) in cmake
    assert "add_subdirectory(FMSAMRegistration)" in cmake
    s4ext = dict(line.split(" ", 1) for line in open(os.path.join(ROOT, "FMSAMRegistration.s4ext")).read().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    assert s4ext["category"] == entry["category"]
    assert s4ext["scmurl"] == entry["scm_url"]
    assert s4ext["depends"] == " ".join(entry["build_dependencies"])
    module_source = open(MODULE_FILE).read()
    assert '_("Registration")' in module_source and '_("FM-SAM Registration")' in module_source


def test_module_and_library_never_import_torch_at_load_time():
    for path in [MODULE_FILE] + sorted(
            os.path.join(MODULE_DIR, "FMSAMRegistrationLib", name)
            for name in os.listdir(os.path.join(MODULE_DIR, "FMSAMRegistrationLib")) if name.endswith(".py")):
        tree = ast.parse(open(path).read())
        for node in tree.body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "torch" for name in names), path


def run_without_torch(code):
    """Run ``code`` in a fresh Python where ``import torch`` fails, as in a Slicer without PyTorch."""
    prelude = "import sys\nsys.modules['torch'] = None\nsys.path[:0] = [%r, %r]\n" % (
        MODULE_DIR, os.path.join(ROOT, "Logic"))
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


def test_without_torch_the_library_loads_and_registering_says_how_to_install():
    pytest.importorskip("slicer", reason="needs slicer-core")
    result = run_without_torch(
        "from FMSAMRegistrationLib import RegistrationLogic\n"
        "from FMSAMRegistrationLib.torch_support import MISSING, torch_problem, cuda_usable\n"
        "from FMSAMRegistrationLib.scene import new_scene\n"
        "assert torch_problem() == MISSING and not cuda_usable()\n"
        "headless = new_scene()\n"
        "node = headless.scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode')\n"
        "try:\n"
        "    RegistrationLogic(headless.scene).register(node, node)\n"
        "except ValueError as error:\n"
        "    print('REFUSED:', error)\n")
    assert result.returncode == 0, result.stderr
    assert "REFUSED: PyTorch is not installed" in result.stdout


@pytest.fixture()
def torch_support_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fmsam_torch_support", os.path.join(MODULE_DIR, "FMSAMRegistrationLib", "torch_support.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_problem_is_none_with_a_working_torch(torch_support_module):
    assert torch_support_module.torch_problem() is None


def test_torch_built_for_numpy_1_is_explained(torch_support_module, monkeypatch):
    import torch

    def numpy_unavailable(array):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch, "from_numpy", numpy_unavailable)
    message = torch_support_module.torch_problem()
    assert message is not None and "NumPy 1.x" in message and "PyTorch Utils" in message


CONTRIBUTORS = re.compile(r"^[^(),]+ \([^()]+\)(, [^(),]+ \([^()]+\))*$")  # Name (Organisation), ...


def test_extension_index_fields_screenshot_and_contributors():
    """What the ExtensionsIndex's description check requires: a screenshot URL, contributors as
    'Name (Organisation)'; the screenshot is a picture in this repository at its stable raw URL."""
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    s4ext = dict(line.split(" ", 1) for line in open(os.path.join(ROOT, "FMSAMRegistration.s4ext")).read().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', cmake).group(1).split()
    assert screenshots and screenshots == s4ext["screenshoturls"].split()
    prefix = "https://raw.githubusercontent.com/fmsam/SlicerFMSAMRegistration/main/"
    for url in screenshots:
        assert url.startswith(prefix), url
        with open(os.path.join(ROOT, url[len(prefix):]), "rb") as handle:
            picture = handle.read()
        assert picture.startswith(b"\x89PNG") and len(picture) > 50_000
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', cmake).group(1)
    assert CONTRIBUTORS.match(contributors) and s4ext["contributors"] == contributors
    assert CONTRIBUTORS.match(re.search(r'contributors = \["([^"]+)"\]', open(MODULE_FILE).read()).group(1))
    assert "href=" in re.search(r"helpText = _\((.*?)\)\n", open(MODULE_FILE).read(), flags=re.S).group(1)


def _method_source(name):
    tree = ast.parse(open(MODULE_FILE).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(open(MODULE_FILE).read(), node)
    raise AssertionError("no method %s in the module" % name)


def test_opening_the_panel_does_not_touch_pytorch():
    """setup() and what it calls fill the panel without asking PyTorch anything (importing it is
    slow, and a broken PyTorch must not break the panel); Register does."""
    for name in ("setup", "initializeParameterNode", "setParameterNode", "_updateGui", "_updateButton"):
        source = _method_source(name)
        for torch_call in ("cuda_usable", "torch_problem", "_ensureTorch", "import torch"):
            assert torch_call not in source, "%s calls %s" % (name, torch_call)
    register = _method_source("onApplyButton")
    assert "_ensureTorch" in register and "cuda_usable" in register


def test_sample_pair_is_offered_to_the_sample_data_module():
    pytest.importorskip("slicer", reason="the module's library needs slicer-core")
    from FMSAMRegistrationLib.sample_data import sample_source

    source = sample_source(MODULE_DIR)
    assert source["fileNames"] == ["IXI012-HH-1211_T1.nii.gz", "IXI013-HH-1212_T1.nii.gz"]
    for uri in source["uris"]:
        assert uri.startswith("file://")
        from urllib.request import url2pathname
        assert os.path.isfile(url2pathname(uri[len("file://"):]))
    assert os.path.isfile(source["thumbnailFileName"])
