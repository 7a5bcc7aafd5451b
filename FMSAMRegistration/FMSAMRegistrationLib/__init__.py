"""Everything the FM-SAM Registration Slicer module does below its widget.

The package needs Slicer's MRML classes (``import slicer``: Slicer's own Python, or PyPI
``slicer-core`` for tests and scripts) but never ``qt``, ``ctk`` or ``slicer.app``, so it is tested
without the Slicer application. The registration itself is done by the Slicer-free engine
``fmsam``: installed beside this package in a built extension, or ``../../Logic`` in a source tree.
"""
import os
import sys


def _make_engine_importable():
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.join(os.path.dirname(os.path.dirname(here)), "Logic")):
        if os.path.isfile(os.path.join(candidate, "fmsam", "__init__.py")):
            if candidate not in sys.path:
                sys.path.append(candidate)
            return


_make_engine_importable()

from .logic import (MOVING_VOLUME_ACTIONS, ProcessingState, RegistrationLogic,  # noqa: E402
                    RegistrationOutcome)

__all__ = ["RegistrationLogic", "ProcessingState", "RegistrationOutcome", "MOVING_VOLUME_ACTIONS"]
