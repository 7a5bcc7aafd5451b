"""``fmsam register ... --scene OUT.mrb``: the registration as a Slicer scene bundle.

The scene is built by the module's own logic (the nodes, colours, window/level and slice-view
layers the GUI creates), so opening the bundle in Slicer shows what a GUI run would have shown.
"""
import os

from fmsam.errors import InputError


def check_scene_path(path):
    """Refuse a bad ``--scene`` path before any work is done."""
    if not path.lower().endswith(".mrb"):
        raise InputError("--scene must name a .mrb file, not %s" % path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError("the folder for --scene does not exist: %s" % folder)


def write_registration_scene(path, result, fixed_path, moving_path, fixed_labels_path=None,
                             moving_labels_path=None):
    """Load the inputs as Slicer would, add the result's nodes, and write ``path`` (.mrb)."""
    from .logic import RegistrationLogic
    from .scene import new_scene

    headless = new_scene()
    fixed = headless.load_volume(fixed_path)
    moving = headless.load_volume(moving_path)
    for labels_path in (fixed_labels_path, moving_labels_path):
        if labels_path:
            headless.load_volume(labels_path, labelmap=True)
    logic = RegistrationLogic(scene=headless.scene, colorLogic=headless.color_logic)
    outcome = logic.addResultToScene(fixed, moving, result)
    headless.write_bundle(path)
    return outcome
