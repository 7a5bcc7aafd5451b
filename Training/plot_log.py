"""Plot a run's training loss (smoothed) and validation Dice from its log.csv.

    python Training/plot_log.py Training/runs/sam_v1 --out docs/images/sam_v1_curves.png
"""
import argparse
import csv
import os
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each holds log.csv)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smooth", type=int, default=50, help="moving-average window (steps)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        with open(os.path.join(run, "log.csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        name = os.path.basename(os.path.normpath(run))
        steps = np.array([int(r["step"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        window = max(1, min(args.smooth, len(loss)))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        loss_axis.plot(steps[window - 1:], smooth, label=name)
        validated = [r for r in rows if r["val_dice"]]
        if validated:
            dice_axis.plot([int(r["step"]) for r in validated], [float(r["val_dice"]) for r in validated],
                           "o-", label=name)
            dice_axis.axhline(float(validated[0]["val_dice_identity"]), color="grey", ls="--",
                              label="template-aligned (affine)" if run == args.runs[0] else None)
    loss_axis.set(xlabel="step", ylabel="loss (%d-step mean)" % args.smooth, title="training loss")
    dice_axis.set(xlabel="step", ylabel="mean Dice", title="validation Dice (20 template-aligned val pairs, 2 mm)")
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out, dpi=90)
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
