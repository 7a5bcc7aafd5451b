"""The module's results line for the sample pair, fast and accurate, through the Slicer logic on
slicer-core (what the README's panel walkthrough shows). Usage: python3 slicer_logic_sample.py"""
import os
import sys

# Testing/ for conftest: the sample pair, and this checkout's engine and module library first.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from conftest import FIXED, MOVING, sample  # noqa: E402
from FMSAMRegistrationLib import RegistrationLogic  # noqa: E402
from FMSAMRegistrationLib.scene import new_scene  # noqa: E402

headless = new_scene()
fixed, moving = headless.load_volume(sample(FIXED)), headless.load_volume(sample(MOVING))
fixed_labels = headless.load_volume(sample(FIXED, "labels"), labelmap=True)
moving_labels = headless.load_volume(sample(MOVING, "labels"), labelmap=True)
logic = RegistrationLogic(headless.scene, headless.color_logic)
for mode in ("fast", "accurate"):
    outcome = logic.register(fixed, moving, fixedSegmentationNode=fixed_labels,
                             movingSegmentationNode=moving_labels, device="cpu", mode=mode)
    print(mode + ":", outcome.summary())
