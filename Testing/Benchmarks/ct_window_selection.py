"""Issue 15 experiment (selection data only): the engine's CT window on the abdomen selection pairs.

``fmsam.intensity`` maps CT from a fixed window (``CT_WINDOW_HU``, -1000 to 1000 HU) to [0, 1]; soft
tissue then fills a narrow band of the network's input range. This renders the abdomen selection
pairs once, as ``Training/evaluate_selection.py`` does (the renderings do not depend on the window
tried: they are made before it is changed), then registers them with the bundled model in fast mode
(``modality="ct"``) under each window given, and prints the mean organ Dice after registration.
It changes nothing in the engine (the window is set in this process only).

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
        python3 Testing/Benchmarks/ct_window_selection.py -1000:1000 -200:300 -400:600 -150:250
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# This checkout's engine and trainer helpers, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(ROOT, "Training"))
sys.path.insert(0, os.path.join(ROOT, "Logic"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

import evaluate_selection  # noqa: E402
import fmsam.intensity as intensity  # noqa: E402
from data_splits import SPLITS_FILE, load_splits  # noqa: E402
from fmsam.pipeline import register  # noqa: E402
from fmsam.weights import load_model  # noqa: E402


def main(argv=None):
    windows = [tuple(float(v) for v in item.split(":")) for item in (argv or sys.argv[1:])]
    torch.set_num_threads(1)
    data = os.path.join(ROOT, "..", "shared", "data", "abdomen_labels")
    maps = load_splits(SPLITS_FILE)["abdomen"]["selection"]
    labels = [sitk.ReadImage(os.path.join(data, m + ".nii.gz"), sitk.sitkUInt8) for m in maps]
    pairs = evaluate_selection.pairs_of(6, len(maps))
    images = evaluate_selection.rendered_pairs(labels, pairs)  # with the default window, once
    model = load_model(None, "cpu")
    for window in windows:
        intensity.CT_WINDOW_HU = window
        dice = [register(fixed, moving, labels[first], labels[second], device="cpu", modality="ct",
                         model=model).report["dice_after"]
                for (fixed, moving), (first, second) in zip(images, pairs)]
        print("window %g..%g HU: mean registered Dice %.4f (pairs %s)"
              % (window[0], window[1], np.mean(dice), " ".join("%.3f" % d for d in dice)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
