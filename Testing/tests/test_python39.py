"""Slicer 5.6/5.8 run Python 3.9: every module, script and test must parse with 3.9 grammar."""
import ast
import glob
import os

import pytest

from conftest import ROOT

SOURCES = sorted(
    path for pattern in ("Logic/**/*.py", "Training/**/*.py", "Testing/**/*.py",
                         "FMSAMRegistration/**/*.py")
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_parses_as_python_39(path):
    with open(path) as handle:
        ast.parse(handle.read(), filename=path, feature_version=(3, 9))


def test_sources_found():
    assert len(SOURCES) > 20
