"""One home for the engine's choices (fmsam.options): the command line and the module read them."""
import ast
import os

import pytest

from conftest import ROOT
from fmsam import options
from fmsam.cli import build_parser, io_steps


@pytest.mark.parametrize("extra, steps", [([], 0), (["--mode", "accurate"], 18), (["--mode", "fast"], 0),
                                          (["--mode", "accurate", "--io-steps", "5"], 5),
                                          (["--io-steps", "7"], 7)])
def test_mode_means_the_same_on_the_command_line(extra, steps):
    for command in (["register", "f.nii", "m.nii", "--out", "o"], ["evaluate", "--pairs", "p.csv", "--out", "r.csv"]):
        assert io_steps(build_parser().parse_args(command + extra)) == steps
    assert options.io_steps_of("accurate") == options.MODES["accurate"] == 18


def test_choices_are_defined_once():
    """No engine or module file but fmsam/options.py assigns the choice tuples."""
    names = {"DEVICES", "MODALITIES", "CONTRAST_MATCHING", "MODES", "STAGES", "STAGE_TITLES", "MAX_IO_STEPS"}
    owners = {}
    for folder in (os.path.join(ROOT, "Logic", "fmsam"), os.path.join(ROOT, "FMSAMRegistration")):
        for directory, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    for node in ast.parse(open(path).read()).body:
                        if isinstance(node, ast.Assign):
                            for target in node.targets:
                                if isinstance(target, ast.Name) and target.id in names:
                                    owners.setdefault(target.id, []).append(os.path.relpath(path, ROOT))
    assert owners == {name: [os.path.join("Logic", "fmsam", "options.py")] for name in names}
    with pytest.raises(ValueError, match="fast, accurate"):
        options.io_steps_of("slow")


def test_the_engine_imports_nothing_from_the_slicer_module():
    """Arrows point down: the module imports the engine, never the other way (``--scene`` finds the
    module's writer through the ``fmsam.scene_export`` entry point instead)."""
    engine = os.path.join(ROOT, "Logic", "fmsam")
    for name in sorted(os.listdir(engine)):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(engine, name)).read())):
                modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(module.split(".")[0] in ("FMSAMRegistrationLib", "slicer", "FMSAMRegistration")
                               for module in modules), "%s imports %s" % (name, modules)
