"""How sharp is a trained model's minimum? The training loss along random weight directions.

For each model, ``--directions`` random directions are drawn with one seed shared by all models and
filter-normalised (Li et al., "Visualizing the Loss Landscape of Neural Nets", 2018: each
filter's direction is scaled to that filter's weight norm, so models with different weight scales
are comparable). The loss (the training objective: symmetric local NCC + GradICON, with a fixed
sampling offset) is averaged over ``--pairs`` fixed training pairs at ``w + alpha * d`` for alphas
in [-``--radius``, ``--radius``]. With ``--mix`` the pairs are the
trainer's pairs of that multi-anatomy mix (``train.draw_pair`` without augmentation, steps 0, 1, ...
of ``--seed``, each on its own network grid at the model's voxel budget; cardiac and abdomen from the
training subjects of ``--splits``), so models trained on a mix are measured on what they trained on.
Writes ``OUT.csv`` (model, direction, alpha, loss) and ``OUT.png``,
and prints each model's sharpness: the mean over directions of the largest loss increase within
``|alpha| <= radius / 2``.

Usage:
    python Training/sharpness.py --cache Training/cache --models sam=Training/runs/sam_v1/best.pt \\
        adam=Training/runs/adam_v1/best.pt --out docs/images/sharpness
"""
import argparse
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(HERE, "..", "Logic"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoints import load_network  # noqa: E402
from training_data import SubjectCache, read_split, sample_pair, sampling_offset  # noqa: E402
from fmsam.losses import symmetric_registration_loss  # noqa: E402


def filter_normalised_direction(network, generator):
    """A random direction shaped like the weights, each filter scaled to its weight norm; biases
    and normalisation parameters (1-D) get no direction, as in Li et al."""
    direction = []
    for parameter in network.parameters():
        if parameter.dim() <= 1:
            direction.append(torch.zeros_like(parameter))
            continue
        random = torch.randn(parameter.shape, generator=generator)
        dims = tuple(range(1, parameter.dim()))
        scale = (torch.linalg.vector_norm(parameter.detach(), dim=dims, keepdim=True)
                 / (torch.linalg.vector_norm(random, dim=dims, keepdim=True) + 1e-10))
        direction.append(random * scale)
    return direction


@torch.no_grad()
def loss_at(network, config, pairs):
    total = 0.0
    for fixed, moving, offset in pairs:
        both = network(torch.cat([fixed, moving]), torch.cat([moving, fixed]))
        loss = symmetric_registration_loss(fixed, moving, both[:1], both[1:], config.get("gradicon_weight", 1.5),
                                           config.get("ncc_window", 5), offset)[0]
        total += float(loss)
    return total / len(pairs)


def mix_pairs(args, cache, grid):
    """``[(fixed, moving, offset), ...]``: the trainer's first ``args.pairs`` pairs of ``args.mix``
    (no augmentation), each with its step's sampling offset on its own grid."""
    import train

    options = ["--cache", args.cache, "--run", "unused", "--mix", args.mix, "--seed", str(args.seed),
               "--grid", ",".join(str(n) for n in grid), "--no-augment"]
    options += ["--data", args.data] if args.data else []
    options += ["--splits", args.splits] if args.splits else []
    settings = train.parse_args(options)
    training, _ = train.load_anatomy(settings, 1)
    pairs = []
    for index in range(args.pairs):
        fixed, moving = train.draw_pair(settings, cache, index, 0, grid, training)
        pairs.append((fixed, moving, sampling_offset(args.seed, index, fixed.shape[2:])))
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="name=path (checkpoint or weights)")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--directions", type=int, default=2)
    parser.add_argument("--radius", type=float, default=0.5)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--mix", help="draw the pairs from this --mix of train.py (e.g. "
                                      "brain=0.4,cardiac=0.25,abdomen=0.25,shapes=0.1)")
    parser.add_argument("--data", help="shared data folder for --mix (default: train.py's)")
    parser.add_argument("--splits", help="split file for --mix (default: train.py's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models)
    alphas = np.linspace(-args.radius, args.radius, args.points)
    rows = []
    for name, path in models.items():
        network, config = load_network(path)
        grid = tuple(config["grid"])
        cache = SubjectCache(args.cache, read_split(args.cache)["train"], grid)
        if args.mix:
            pairs = mix_pairs(args, cache, grid)
        else:
            pairs = [sample_pair(cache, args.seed, index, augment=False) + (sampling_offset(args.seed, index, grid),)
                     for index in range(args.pairs)]
        weights = [parameter.detach().clone() for parameter in network.parameters()]
        generator = torch.Generator().manual_seed(args.seed)
        for direction_index in range(args.directions):
            direction = filter_normalised_direction(network, generator)
            for alpha in alphas:
                with torch.no_grad():
                    for parameter, weight, step in zip(network.parameters(), weights, direction):
                        parameter.copy_(weight + float(alpha) * step)
                rows.append({"model": name, "direction": direction_index, "alpha": float(alpha),
                             "loss": loss_at(network, config, pairs)})
                print("%s d%d alpha %+.2f loss %.4f" % (name, direction_index, alpha, rows[-1]["loss"]), flush=True)
        with torch.no_grad():
            for parameter, weight in zip(network.parameters(), weights):
                parameter.copy_(weight)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ("model", "direction", "alpha", "loss"))
        writer.writeheader()
        writer.writerows(rows)
    summary = {}
    for name in models:
        increases = []
        for direction_index in range(args.directions):
            curve = {row["alpha"]: row["loss"] for row in rows
                     if row["model"] == name and row["direction"] == direction_index}
            centre = curve[min(curve, key=abs)]
            near = [loss for alpha, loss in curve.items() if abs(alpha) <= args.radius / 2 + 1e-9]
            increases.append(max(near) - centre)
        summary[name] = float(np.mean(increases))
        print("%s: sharpness (largest loss increase within |alpha| <= %.2f, mean of %d directions) %.4f"
              % (name, args.radius / 2, args.directions, summary[name]))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    for index, name in enumerate(models):
        for direction_index in range(args.directions):
            curve = sorted((row["alpha"], row["loss"]) for row in rows
                           if row["model"] == name and row["direction"] == direction_index)
            axes.plot(*zip(*curve), color="C%d" % index, alpha=0.8,
                      label="%s (sharpness %.3f)" % (name, summary[name]) if direction_index == 0 else None)
    axes.set_xlabel("alpha (filter-normalised random direction)")
    axes.set_ylabel("training loss, %d fixed pairs" % args.pairs)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
