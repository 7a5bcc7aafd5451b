"""Turn a training checkpoint into the bundled model: weights file, checksum and manifest.

    python Training/export_model.py --checkpoint Training/runs/adam_v1/best.pt \\
        --out Logic/fmsam/weights/fmsam_adam_v1.pt

The manifest (``weights/manifest.json``) names the file and its SHA-256, which
``fmsam.weights.load_model`` verifies; the model card (MODEL_CARD.md) is written by hand from the
run's config and the ``fmsam evaluate`` results.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's engine, not an installed fmsam of another version.
sys.path.insert(0, os.path.join(HERE, "..", "Logic"))

from checkpoints import network_from  # noqa: E402
from fmsam.errors import InputError  # noqa: E402
from fmsam.weights import MANIFEST, read_state, save_weights, validate_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="weights file inside Logic/fmsam/weights/")
    parser.add_argument("--no-manifest", action="store_true",
                        help="only write the weights and .sha256 (for a model that is not bundled)")
    parser.add_argument("--output-smoothing", type=float, default=None,
                        help="Gaussian sigma (network-grid voxels) applied to fast mode's field; 0: none "
                        "(default: the source's setting, none for a checkpoint)")
    parser.add_argument("--network-passes", type=int, default=None,
                        help="fast mode's network passes, each on the moving image warped by the ones "
                        "before (default: the source's setting, 1 for a checkpoint)")
    parser.add_argument("--grid", help="network grid D,H,W whose voxel count sets the inference grid "
                        "(default: the training grid)")
    args = parser.parse_args(argv)
    weights, config, saved = read_state(args.checkpoint)  # saved: step, best_dice, ...
    network = network_from(weights, config)
    if args.output_smoothing is not None:
        config["output_smoothing"] = args.output_smoothing
    if args.network_passes is not None:
        config["network_passes"] = args.network_passes
    if args.grid:
        config.setdefault("training_grid", config["grid"])  # a re-exported file keeps the real one
        config["grid"] = [int(n) for n in args.grid.split(",")]
    try:  # a bad setting is refused here, not when the file is loaded
        validate_config(config, args.out)
    except InputError as error:
        print("export_model: error: %s" % error, file=sys.stderr)
        return 2
    # A weights file (exported before) records no step or validation Dice; a checkpoint does.
    step, dice = saved.get("step"), saved.get("best_dice")
    if step is None and not args.no_manifest:  # the bundled model's weights again: keep its record
        step, dice = bundled_record_if_same_weights(weights)
    checksum = save_weights(args.out, network, config)
    print("wrote %s (sha256 %s, %s)" % (args.out, checksum, "step %d, validation Dice %.4f" % (step, dice)
                                        if step is not None else "from a weights file: no step recorded"))
    if not args.no_manifest:
        manifest = {"file": os.path.basename(args.out), "sha256": checksum, "config": config}
        if step is not None:
            manifest.update(training_step=step, training_validation_dice=dice)
        manifest["parameters"] = sum(p.numel() for p in network.parameters())
        with open(MANIFEST, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.write("\n")
        print("updated %s" % MANIFEST)
    return 0


def bundled_record_if_same_weights(weights):
    """``(training_step, training_validation_dice)`` of the manifest's bundled file when ``weights``
    (a state dict) are its weights tensor for tensor (a bundled model exported again with other
    inference settings, from that file or a copy of it), else ``(None, None)``."""
    import torch

    if not os.path.isfile(MANIFEST):
        return None, None
    previous = json.load(open(MANIFEST))
    path = os.path.join(os.path.dirname(MANIFEST), previous["file"])
    if not os.path.isfile(path):
        return None, None
    bundled = read_state(path)[0]
    same = bundled.keys() == weights.keys() and all(torch.equal(bundled[key], weights[key]) for key in weights)
    if not same:
        return None, None
    return previous.get("training_step"), previous.get("training_validation_dice")


if __name__ == "__main__":
    sys.exit(main())
