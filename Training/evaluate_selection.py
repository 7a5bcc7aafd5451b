"""Abdomen organ Dice through the whole engine, for choosing among checkpoints (selection maps only).

The trainer's abdomen validation runs the network alone on roughly aligned maps. Here each pair of
two different maps of the split's ``--role`` (default ``selection``; ``report`` only for published
figures) is rendered CT-like in Hounsfield units (``anatomy.render_ct_hounsfield`` with a palette fixed by
the pair's index, noise 15 HU), and registered by
:func:`fmsam.pipeline.register` exactly as a user's pair would be (CT normalisation, affine
pre-alignment, network on its grid, fast mode), with the maps as label maps: Dice before, after the
affine, and after registration, and the folding share.

    python Training/evaluate_selection.py --models v12=Logic/fmsam/weights/fmsam_adam_v12.pt \\
        adam=Training/runs/i15_adam_mix/latest.pt --grid 64,80,80 --output-smoothing 0.8 --threads 1

``--grid``/``--output-smoothing`` override the models' own settings, so checkpoints and the bundled
model are compared on one grid. Prints one line per pair and model, and each model's means.

``--write-pairs DIR`` writes the same rendered pairs instead of registering them, for the benchmarks
(``Testing/Benchmarks/benchmark.py run --pairs DIR/pairs.csv``), so figures of either path are on
identical images:

    python Training/evaluate_selection.py --role report --pairs 6 --write-pairs out/abdomen_report
"""
import argparse
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(HERE, "..", "Logic"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from anatomy import ORGAN_HU, render_ct_hounsfield  # noqa: E402
from checkpoints import load_network  # noqa: E402
from data_splits import SPLITS_FILE, load_splits  # noqa: E402
from fmsam.pipeline import register  # noqa: E402


def rendered_ct(label_image, generator, hu_means, noise_hu=15.0):
    """A float32 SimpleITK image in Hounsfield units on ``label_image``'s grid: the map rendered by
    ``anatomy.render_ct_hounsfield``."""
    labels = torch.from_numpy(sitk.GetArrayFromImage(label_image).astype(np.float32))[None, None]
    hounsfield = render_ct_hounsfield(generator, labels, hu_means, noise_hu)[0, 0].numpy()
    image = sitk.GetImageFromArray(hounsfield.astype(np.float32))
    image.CopyInformation(label_image)
    return image


def pairs_of(count, subjects):
    """The trainer's validation pairs: (i, i + 1), (i, i + 2), ... cyclically, ``count`` of them."""
    pairs = [(i, (i + offset) % subjects) for offset in range(1, subjects) for i in range(subjects)]
    return pairs[:count]


def rendered_pairs(labels, pairs):
    """``[(fixed, moving)]``: float32 SimpleITK images in HU on their label maps' grids, one per
    ``(first, second)`` of ``pairs`` (indices into ``labels``), ``first`` fixed. Pair number ``n``
    draws from a generator seeded ``1000 + n``: an organ palette (``ORGAN_HU`` +-25 HU), then the
    fixed image, then the moving one."""
    images = []
    for index, (first, second) in enumerate(pairs):
        generator = torch.Generator().manual_seed(1_000 + index)
        hu = torch.tensor(ORGAN_HU) + 25.0 * (2 * torch.rand(len(ORGAN_HU), generator=generator) - 1)
        images.append((rendered_ct(labels[first], generator, hu), rendered_ct(labels[second], generator, hu)))
    return images


def write_pairs(folder, maps, label_paths, pairs, images):
    """Write ``images`` (from :func:`rendered_pairs`) as ``NN_fixed_MAP.nii.gz`` /
    ``NN_moving_MAP.nii.gz`` (float32, HU) into ``folder`` and list them with their label maps in
    ``folder/pairs.csv`` (``fixed,moving,fixed_labels,moving_labels``, paths relative to the CSV,
    the format of ``fmsam.evaluate.read_pairs``). Returns the CSV's path."""
    os.makedirs(folder, exist_ok=True)
    csv_path = os.path.join(folder, "pairs.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for index, ((first, second), (fixed, moving)) in enumerate(zip(pairs, images)):
            names = ["%02d_%s_%s.nii.gz" % (index, role, maps[n]) for role, n in (("fixed", first), ("moving", second))]
            for name, image in zip(names, (fixed, moving)):
                sitk.WriteImage(image, os.path.join(folder, name), useCompression=True)
            writer.writerow(names + [os.path.relpath(label_paths[n], folder) for n in (first, second)])
    return csv_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="name=path (checkpoint or weights file)")
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    parser.add_argument("--splits", default=SPLITS_FILE)
    parser.add_argument("--role", choices=("selection", "report"), default="selection")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--grid", help="network grid budget D,H,W for every model (default: each model's)")
    parser.add_argument("--output-smoothing", type=float, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--write-pairs", metavar="DIR",
                        help="write the rendered pairs and DIR/pairs.csv, and register nothing")
    args = parser.parse_args(argv)
    if not (args.models or args.write_pairs):
        parser.error("give --models to register, or --write-pairs DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    maps = load_splits(args.splits)["abdomen"][args.role]
    label_paths = [os.path.join(args.data, "abdomen_labels", m + ".nii.gz") for m in maps]
    labels = [sitk.ReadImage(path, sitk.sitkUInt8) for path in label_paths]
    pairs = pairs_of(args.pairs, len(maps))
    images = rendered_pairs(labels, pairs)
    if args.write_pairs:
        print("%d %s pairs -> %s" % (len(pairs), args.role, write_pairs(args.write_pairs, maps, label_paths, pairs, images)))
        return 0
    results = {}
    for item in args.models:
        name, path = item.split("=", 1)
        network, config = load_network(path)
        if args.grid:
            config["grid"] = [int(v) for v in args.grid.split(",")]
        if args.output_smoothing is not None:
            config["output_smoothing"] = args.output_smoothing
        for (first, second), (fixed, moving) in zip(pairs, images):
            report = register(fixed, moving, labels[first], labels[second], device="cpu", modality="ct",
                              model=(network, config)).report
            row = (report["dice_initial"], report["dice_affine"], report["dice_after"], report.get("folding_percent", float("nan")))
            results.setdefault(name, []).append(row)
            print("%s %s->%s  Dice initial %.4f  affine %.4f  registered %.4f  grid %s  folding %s"
                  % (name, maps[second], maps[first], row[0], row[1], row[2], report["network_grid"],
                     report.get("folding_percent", "-")), flush=True)
    for name, rows in results.items():
        mean = np.mean(np.array(rows, dtype=np.float64), axis=0)
        print("%s: %s %d pairs, mean Dice initial %.4f  affine %.4f  registered %.4f"
              % (name, args.role, len(rows), mean[0], mean[1], mean[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
