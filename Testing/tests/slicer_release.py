"""Slicer's own Python layer of a real release, run on slicer-core's MRML (for tests).

``../shared/slicer-python/<release>/slicer`` holds ``util.py``, ``i18n.py``,
``ScriptedLoadableModule.py`` and ``parameterNodeWrapper/`` exactly as Slicer ships them. slicer-core
(PyPI) supplies the MRML classes but none of that layer. :func:`loaded` puts a release's files in
place as sub-modules of slicer-core's ``slicer`` package for the duration of a ``with`` block, with
placeholder classes for the Qt/CTK/qMRML widget names that Slicer's code mentions at import time
(the widgets themselves exist only in the application), then imports the module file
``FMSAMRegistration/FMSAMRegistration.py`` against it and restores everything afterwards.
"""
import contextlib
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLICER_PYTHON = os.path.join(ROOT, "..", "shared", "slicer-python")
RELEASES = ("v5.6.2", "v5.8.1", "v5.10.0")
MODULE_FILE = os.path.join(ROOT, "FMSAMRegistration", "FMSAMRegistration.py")

#: The names this module replaces in ``sys.modules`` (and as attributes of ``slicer``).
_REPLACED = ("qt", "ctk", "slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule",
             "slicer.parameterNodeWrapper")


def release_folder(release):
    return os.path.join(SLICER_PYTHON, release, "slicer")


def available():
    """Why the releases cannot be loaded ('' when they can)."""
    missing = [release for release in RELEASES if not os.path.isdir(release_folder(release))]
    if missing:
        return ("Slicer's Python layer is not here (%s missing): it comes with the project's shared "
                "folder, which CI and development machines have but a user's clone does not"
                % ", ".join(os.path.join(SLICER_PYTHON, release) for release in missing))
    return ""


class Placeholder:
    """Stands for a Qt/CTK/qMRML class: it can be subclassed, instantiated and given attributes (the
    widget connectors of the parameter node wrapper set ``nodeTypes`` and the like on it)."""

    def __init__(self, *args, **kwargs):
        pass


class _Application(Placeholder):
    """Stands for ``slicer.app`` where Slicer's code needs it at import time: ``slicer.i18n.tr``
    translates through it (an application without a translation returns the text)."""

    @staticmethod
    def translate(context, text):
        return text


def _placeholder_module(name):
    module = types.ModuleType(name)
    classes = {}

    def __getattr__(attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if attribute not in classes:
            classes[attribute] = type(attribute, (Placeholder,), {})
        return classes[attribute]

    module.__getattr__ = __getattr__
    return module


def _load(name, path, package_folder=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_folder] if package_folder else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Release:
    """What :func:`loaded` gives: the release's modules and the module file imported against them."""

    def __init__(self, name, util, parameter_node_wrapper, module):
        self.name = name
        self.util = util
        self.parameterNodeWrapper = parameter_node_wrapper
        self.module = module  # FMSAMRegistration.py, imported with this release's Slicer code

    def placeholder(self, qualified_name):
        """The placeholder class Slicer's code sees for e.g. 'qt.QCheckBox' or
        'slicer.qMRMLNodeComboBox'."""
        package, name = qualified_name.split(".")
        return getattr(sys.modules[package], name)


@contextlib.contextmanager
def loaded(release):
    """``with loaded('v5.8.1') as slicer_release:`` Slicer's Python layer of that release in place."""
    import slicer

    folder = release_folder(release)
    saved_modules = {name: sys.modules.get(name) for name in list(sys.modules)
                     if name in _REPLACED or name.startswith("slicer.parameterNodeWrapper.")}
    saved_attributes = {name: slicer.__dict__.get(name) for name in
                        ("util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "__getattr__", "app")}
    try:
        sys.modules["qt"] = _placeholder_module("qt")
        sys.modules["ctk"] = _placeholder_module("ctk")
        qmrml = _placeholder_module("slicer")

        def slicer_getattr(attribute):  # qMRMLNodeComboBox, qMRMLSubjectHierarchyTreeView, ...
            if attribute.startswith("q"):
                return getattr(qmrml, attribute)
            raise AttributeError(attribute)

        slicer.__getattr__ = slicer_getattr
        slicer.app = _Application()
        slicer.util = _load("slicer.util", os.path.join(folder, "util.py"))
        slicer.i18n = _load("slicer.i18n", os.path.join(folder, "i18n.py"))
        pnw_folder = os.path.join(folder, "parameterNodeWrapper")
        slicer.parameterNodeWrapper = _load("slicer.parameterNodeWrapper",
                                            os.path.join(pnw_folder, "__init__.py"), pnw_folder)
        slicer.ScriptedLoadableModule = _load("slicer.ScriptedLoadableModule",
                                              os.path.join(folder, "ScriptedLoadableModule.py"))
        module = _load("FMSAMRegistration_%s" % release.replace(".", "_"), MODULE_FILE)
        yield Release(release, slicer.util, slicer.parameterNodeWrapper, module)
    finally:
        for name in [name for name in sys.modules
                     if name in _REPLACED or name.startswith("slicer.parameterNodeWrapper.")
                     or name.startswith("FMSAMRegistration_v")]:
            del sys.modules[name]
        sys.modules.update({name: module for name, module in saved_modules.items() if module is not None})
        for name, value in saved_attributes.items():
            if value is None:
                slicer.__dict__.pop(name, None)
            else:
                setattr(slicer, name, value)
