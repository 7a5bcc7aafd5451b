"""Issue 15 experiment (selection data only): the engine's CT mapping on the abdomen selection pairs.

``fmsam.intensity`` maps CT from Hounsfield units to [0, 1] through fixed knots (``CT_KNOTS_HU``);
with a wide window soft tissue fills a narrow band of the network's input range. This renders the
abdomen selection pairs once in HU, as ``Training/evaluate_selection.py`` does, then registers them
with the bundled model (or ``--weights``) in fast mode under each mapping given, and prints the mean
organ Dice after registration. A mapping is ``LOW:HIGH`` (a window: LOW HU -> 0, HIGH HU -> 1),
``knots:HU=V,HU=V,...`` (piecewise linear) or ``mr`` (the MR path: percentile normalisation, what
``auto`` picks for these renderings, which have no air). It changes nothing in the engine (the
knots are set in this process only).

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
        python3 Testing/Benchmarks/ct_window_selection.py [--pairs 12] [--weights W] -1000:1000 -150:250 mr \
        knots:-1000=0,-200=0.1,300=0.9,1500=1
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


def parse_mapping(text):
    """``(modality, knots or None)`` of one command-line mapping (see the module's docstring)."""
    if text == "mr":
        return "mr", None
    if text.startswith("knots:"):
        knots = tuple(tuple(float(v) for v in item.split("=")) for item in text[len("knots:"):].split(","))
    else:
        low, high = (float(v) for v in text.split(":"))
        knots = ((low, 0.0), (high, 1.0))
    if any(b[0] <= a[0] for a, b in zip(knots, knots[1:])):
        raise SystemExit("knots must have increasing HU: %s" % text)
    return "ct", knots


def main(argv=None):
    args = list(argv or sys.argv[1:])
    weights, count = None, 6
    while args[:1] in (["--weights"], ["--pairs"]):
        if args[0] == "--weights":
            weights = args[1]
        else:
            count = int(args[1])
        args = args[2:]
    mappings = [(text,) + parse_mapping(text) for text in args]
    torch.set_num_threads(1)
    data = os.path.join(ROOT, "..", "shared", "data", "abdomen_labels")
    maps = load_splits(SPLITS_FILE)["abdomen"]["selection"]
    labels = [sitk.ReadImage(os.path.join(data, m + ".nii.gz"), sitk.sitkUInt8) for m in maps]
    pairs = evaluate_selection.pairs_of(count, len(maps))
    images = evaluate_selection.rendered_pairs(labels, pairs)  # in HU, once
    model = load_model(weights, "cpu")
    for text, modality, knots in mappings:
        if knots is not None:
            intensity.CT_KNOTS_HU = knots
        results = [register(fixed, moving, labels[first], labels[second], device="cpu", modality=modality,
                            model=model).report
                   for (fixed, moving), (first, second) in zip(images, pairs)]
        dice = [r["dice_after"] for r in results]
        print("%s: mean Dice after the affine %.4f, registered %.4f (pairs %s), folding max %.4f %%"
              % (text, np.mean([r["dice_affine"] for r in results]), np.mean(dice), " ".join("%.3f" % d for d in dice),
                 max(r["folding_percent"] for r in results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
