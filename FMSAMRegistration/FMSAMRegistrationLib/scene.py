"""A Slicer scene without the Slicer application: for the command line's ``--scene`` and for tests.

Inside Slicer use ``slicer.mrmlScene``; outside it, :func:`new_scene` builds a scene wired like the
application's (application logic, colour logic with the default colour nodes, volumes, transforms
and segmentations logics) so that nodes made here are the nodes Slicer makes.
"""
import contextlib
import os
import shutil
import tempfile

import slicer
import vtk

from fmsam.errors import InputError
from fmsam.outputs import partial_prefix, remove_dead_partials


@contextlib.contextmanager
def _vtk_messages(verbosity):
    """Show only VTK/MRML messages at ``verbosity`` or more severe while the block runs."""
    before = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(verbosity)
    try:
        yield
    finally:
        vtk.vtkLogger.SetStderrVerbosity(before)


class HeadlessScene:
    """A scene and the logics it needs; keeps them alive as long as the scene is used."""

    def __init__(self, cache_directory=None):
        # The colour logic looks for optional colour files in the application's home directory;
        # there is none here, and its error message would only be noise.
        with _vtk_messages(vtk.vtkLogger.VERBOSITY_OFF):
            self._create_logics()
        # Reading .mrb bundles goes through the data-IO manager, which needs a cache folder.
        # One shared folder, not one per scene: scenes are made per --scene run and per test.
        self._cache = cache_directory or os.path.join(tempfile.gettempdir(), "fmsam-mrml-cache")
        os.makedirs(self._cache, exist_ok=True)
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.SetMRMLScene(self.scene)
        self.remote_io.GetCacheManager().SetRemoteCacheDirectory(self._cache)
        self.data_io = slicer.vtkDataIOManagerLogic()
        self.data_io.SetMRMLApplicationLogic(self.application_logic)
        self.data_io.SetAndObserveDataIOManager(self.scene.GetDataIOManager())
        self.remote_io.AddDataIOToScene()
        slicer.mrmlScene = self.scene

    def _create_logics(self):
        self.scene = slicer.vtkMRMLScene()
        self.application_logic = slicer.vtkSlicerApplicationLogic()
        self.application_logic.SetMRMLScene(self.scene)
        self.logics = {}
        self.color_logic = self._add_logic("Colors", slicer.vtkSlicerColorLogic())
        self.color_logic.AddDefaultColorNodes()
        self.volumes_logic = self._add_logic("Volumes", slicer.vtkSlicerVolumesLogic())
        self.transform_logic = self._add_logic("Transforms", slicer.vtkSlicerTransformLogic())
        self.segmentations_logic = self._add_logic("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())

    def _add_logic(self, name, logic):
        logic.SetMRMLApplicationLogic(self.application_logic)
        logic.SetMRMLScene(self.scene)
        self.application_logic.SetModuleLogic(name, logic)
        self.logics[name] = logic
        return logic

    def load_volume(self, path, name=None, labelmap=False):
        """Load a volume file the way Slicer's Add Data does (the node keeps its storage node)."""
        name = name or os.path.basename(path).split(".")[0]
        # Label maps ask for Slicer's GenericColors file, which only the application ships; the
        # reference is kept (Slicer resolves it when it opens the scene), the warning is not.
        with _vtk_messages(vtk.vtkLogger.VERBOSITY_ERROR):
            node = self.volumes_logic.AddArchetypeVolume(path, name, 1 if labelmap else 0)
        if node is None:
            raise InputError("Slicer could not read %s" % path)
        return node

    def write_bundle(self, path):
        """Write the scene with all its data to an ``.mrb`` file, all or nothing."""
        path = os.path.abspath(path)
        # Slicer names the scene inside the bundle after the file, so the partial file gets the
        # final name, in a hidden folder beside it.
        # Named like the engine's staging folders (host and process), so that a run killed while
        # writing leaves nothing the next run does not clean up.
        folder = os.path.dirname(path)
        remove_dead_partials(folder)
        staging = tempfile.mkdtemp(prefix=partial_prefix(), dir=folder)
        try:
            partial = os.path.join(staging, os.path.basename(path))
            if not self.scene.WriteToMRB(partial):
                raise IOError("Slicer could not write the scene to %s" % path)
            os.replace(partial, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def read_bundle(self, path):
        """Replace the scene's content with an ``.mrb`` file's."""
        if not self.scene.ReadFromMRB(os.path.abspath(path)):
            raise IOError("Slicer could not read the scene %s" % path)
        return self.scene


def new_scene(cache_directory=None):
    return HeadlessScene(cache_directory)
