"""Train the FM-SAM registration network with Sharpness-Aware Minimisation (or plain Adam).

Runs as ``python Training/train.py ...`` and inside Slicer as
``Slicer --no-main-window --python-script Training/train.py --ignore-rest ...`` (no Slicer import).
``--ignore-rest`` stops Slicer's own parser, which would otherwise take ``--help`` and other
options it knows for itself. Whatever happens, the script ends the process with a status code (0
done, 2 bad arguments or a run folder started with other settings, 1 any error, 3 ranks ending with
different weights, 130 interrupted): a window-less Slicer whose script raised an exception would
otherwise keep running forever.

A run directory holds ``config.json``, ``log.csv`` (loss every step, validation Dice every
``--val-every`` steps), ``latest.pt`` (checkpoint, written atomically) and ``best.pt``. Running the same command again resumes exactly where the checkpoint left off.

Example (the bundled model; see Logic/fmsam/weights/MODEL_CARD.md for the exact command)::

    python Training/prepare_data.py --data ../shared/data/ixi --cache Training/cache
    python Training/train.py --cache Training/cache --run Training/runs/sam_v1
"""
import argparse
import contextlib
import csv
import json
import math
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# Training/ is on sys.path: python, torchrun and Slicer's --python-script add the script's folder.
# This checkout's engine, not an installed fmsam of another version (Slicer's Python has none).
sys.path.insert(0, os.path.join(HERE, "..", "Logic"))

try:
    import numpy as np  # noqa: E402
    import torch  # noqa: E402

    from anatomy import (AbdomenSet, CardiacSet, abdomen_pair, abdomen_validation_pair,  # noqa: E402
                         cardiac_pair, cardiac_validation_keys, present_cardiac_pair)
    from checkpoints import save_checkpoint  # noqa: E402
    from data_splits import SPLITS_FILE, load_splits  # noqa: E402
    from synth import synth_pair  # noqa: E402
    from training_data import (SubjectCache, apply_intensity_curve, label_subset,  # noqa: E402
                               random_intensity_curve, read_split, sample_pair, sampling_offset,
                               skull_stripped, thick_slices)
    from fmsam.inference import choose_device  # noqa: E402
    from fmsam.layers import resize, warp  # noqa: E402
    from fmsam.losses import label_overlap_loss, local_ncc_loss, symmetric_registration_loss  # noqa: E402
    from fmsam.metrics import labels_in_both, mean_dice  # noqa: E402
    from fmsam.networks import build_network  # noqa: E402
    from fmsam.options import DEVICES  # noqa: E402
    from fmsam.weights import read_state  # noqa: E402
    from sam import SAM  # noqa: E402
except Exception as _import_error:  # e.g. no PyTorch in this Python (a Slicer without the PyTorch extension)
    if __name__ != "__main__":
        raise
    traceback.print_exc()
    print("train.py: error: cannot import what training needs (%s); inside Slicer, install the "
          "PyTorch extension first" % _import_error, file=sys.stderr)
    sys.exit(1)

LOG_FIELDS = ["step", "loss", "similarity", "regulariser", "lr", "seconds", "val_dice",
              "val_dice_identity", "source", "val_abdomen_dice", "val_abdomen_dice_identity",
              "val_cardiac_lncc", "val_cardiac_lncc_identity", "label_overlap"]
#: Sources of ``--mix``: IXI brains (the cache), MyoPS cardiac stacks, synthetic images of real
#: abdominal label maps, and SynthMorph-style random shapes.
SOURCES = ("brain", "cardiac", "abdomen", "shapes")
DATA = os.path.join(HERE, "..", "..", "shared", "data")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train the FM-SAM registration network.")
    parser.add_argument("--cache", required=True, help="folder written by prepare_data.py")
    parser.add_argument("--run", required=True, help="run folder (created; resumed if it exists)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--optimizer", choices=["sam", "asam", "adam"], default="sam")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM neighbourhood radius")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--gradicon-weight", type=float, default=1.5)
    parser.add_argument("--ncc-window", type=int, default=5)
    parser.add_argument("--clip-norm", type=float, default=10.0)
    parser.add_argument("--grid", default="64,80,80", help="network grid D,H,W")
    parser.add_argument("--coarse-channels", default="16,32,64,64")
    parser.add_argument("--fine-channels", default="8,16,32,64")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: a usable CUDA GPU, else the CPU (fmsam.inference.choose_device)")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-pairs", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--synth-fraction", type=float, default=0.0,
                        help="share of steps on SynthMorph-style synthetic pairs (Training/synth.py)")
    parser.add_argument("--identity-fraction", type=float, default=0.0,
                        help="share of steps registering an image to itself (teaches a zero field)")
    parser.add_argument("--thick-fraction", type=float, default=0.0,
                        help="chance that each image of a real pair is made thick-sliced (2-3.5x, one axis)")
    parser.add_argument("--remap-fraction", type=float, default=0.0,
                        help="share of real pairs whose two images go through one random intensity "
                             "curve (new contrasts, shared within the pair)")
    parser.add_argument("--strip-fraction", type=float, default=0.0,
                        help="chance that one image of a brain pair (fixed or moving, even odds) is "
                             "skull-stripped: zero beyond one voxel of its brain labels (a subject "
                             "against a stripped template or brain)")
    parser.add_argument("--strip-both-fraction", type=float, default=0.0,
                        help="chance that both images of a brain pair are skull-stripped, as in "
                             "skull-stripped data sets (OASIS). No draw at 0, so older runs keep their "
                             "pairs; drawn after --strip-fraction's draw and overriding it when it strikes "
                             "(0.15 with --strip-fraction 0.15: both 15 %%, one 12.75 %%, neither 72.25 %%)")
    parser.add_argument("--mix", type=parse_mix, default=None,
                        help="multi-anatomy mix, e.g. brain=0.5,cardiac=0.2,abdomen=0.2,shapes=0.1 "
                             "(shares of steps, normalised to sum 1; cardiac and abdomen read --data "
                             "and --splits); brain steps keep --identity/--thick/--remap-fraction; "
                             "replaces --synth-fraction (use shapes=); also validates on the abdomen "
                             "and cardiac selection sets")
    parser.add_argument("--data", default=DATA, help="the shared data folder (default: ../shared/data "
                                                      "beside the repository)")
    parser.add_argument("--splits", default=None,
                        help="split file (default: Testing/Benchmarks/data_splits.json)")
    parser.add_argument("--val-abdomen-pairs", type=int, default=6,
                        help="abdomen selection pairs validated with --mix (0: none)")
    parser.add_argument("--val-cardiac-pairs", type=int, default=12,
                        help="cardiac selection pairs validated with --mix (0: none)")
    parser.add_argument("--label-weight", type=float, default=0.0,
                        help="weight of a label-overlap term (1 - soft Dice, both ways; "
                             "fmsam.losses.label_overlap_loss) on the steps whose pairs are rendered "
                             "from label maps (abdomen and shapes of --mix, --synth-fraction); 0: "
                             "the unsupervised uniGradICON loss alone")
    parser.add_argument("--brain-labels", type=int, default=0,
                        help="with --label-weight, also supervise brain steps with this many labels of "
                             "the IXI parcellation (drawn per step among those in both subjects, "
                             "moved with the pair's augmentation); 0: brain steps unsupervised")
    parser.add_argument("--init", help="start from these weights (a weights file or a checkpoint) "
                                       "with a fresh optimiser; the network options must match")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop cleanly (checkpoint written) after this long; 0: no limit")
    args = parser.parse_args(argv)
    if not 0.0 <= args.strip_fraction <= 1.0:
        parser.error("--strip-fraction must lie in 0..1")
    if not 0.0 <= args.strip_both_fraction <= 1.0:
        parser.error("--strip-both-fraction must lie in 0..1")
    if args.mix is not None and args.synth_fraction:
        parser.error("--mix replaces --synth-fraction: give the shapes' share as shapes= in --mix")
    if args.brain_labels < 0 or (args.brain_labels and not args.label_weight > 0):
        parser.error("--brain-labels needs a count of 0 or more and a positive --label-weight")
    return args


def parse_mix(text):
    """``'brain=0.5,cardiac=0.2,...'`` -> ``{source: share}`` over :data:`SOURCES`, shares
    normalised to sum 1 (sources left out get 0)."""
    shares = dict.fromkeys(SOURCES, 0.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in SOURCES:
            raise argparse.ArgumentTypeError("unknown source %r in --mix (sources: %s)" % (name, ", ".join(SOURCES)))
        try:
            shares[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError("--mix needs source=share, not %r" % item)
        if not shares[name] >= 0.0:
            raise argparse.ArgumentTypeError("--mix shares must be 0 or more, not %r" % item)
    total = sum(shares.values())
    if total <= 0:
        raise argparse.ArgumentTypeError("--mix needs a positive share")
    return {name: share / total for name, share in shares.items()}


def mix_source(mix, draw):
    """The source a uniform ``draw`` in [0, 1) picks from a ``--mix`` dict (cumulative shares in
    :data:`SOURCES` order)."""
    total = 0.0
    for name in SOURCES:
        total += mix[name]
        if draw < total and mix[name] > 0:
            return name
    return [name for name in SOURCES if mix[name] > 0][-1]


#: Settings added after the first runs, with the value those runs had.
DEFAULTS = {"synth_fraction": 0.0, "identity_fraction": 0.0, "thick_fraction": 0.0,
            "remap_fraction": 0.0, "init": None, "mix": None, "label_weight": 0.0,
            "brain_labels": 0, "strip_fraction": 0.0, "strip_both_fraction": 0.0}


def _choice_generator(args, step, rank):
    seed = args.seed + 7919 * rank  # each DDP rank draws its own pairs
    return seed, torch.Generator().manual_seed(seed * 1_000_003 + step + 900_000_000)


def step_source(args, step, rank):
    """The source of the step's pair on this rank (as :func:`draw_pair` chooses it), for the log."""
    if args.mix is None:
        draw = torch.rand(1, generator=_choice_generator(args, step, rank)[1]).item()
        return "shapes" if draw < args.synth_fraction else "brain"
    return mix_source(args.mix, torch.rand(1, generator=_choice_generator(args, step, rank)[1]).item())


def draw_pair(args, train_cache, step, rank, grid, anatomy_sets=None, with_labels=False):
    """The step's training pair on this rank: a real pair (with augmentation), a synthetic one, or
    one image twice; with ``--mix``, a pair of the source the step's first draw picks (cardiac and
    abdomen pairs on their own network grid, see ``Training/anatomy.py``; ``anatomy_sets``: dict
    with the training ``"cardiac"`` and ``"abdomen"`` sets). The choice has its own generator, so
    runs without synthetic or identical pairs draw exactly the pairs they drew before these options
    existed, and runs without ``--mix`` those they drew before it existed.

    Returns ``(fixed, moving)``; with ``with_labels``, ``(fixed, moving, labels)`` where ``labels``
    is ``(fixed_labels, moving_labels)`` on the pair's grid for pairs rendered from label maps
    (abdomen, shapes; brain pairs too with ``--brain-labels``, a random subset of their labels drawn
    from a generator of its own) and None for the others (same draws, same images either way)."""
    seed, choice = _choice_generator(args, step, rank)
    draw = torch.rand(1, generator=choice).item()

    def labelled(pair):
        if not with_labels:
            return pair[:2]
        return pair[:2] + ((pair[2], pair[3]) if len(pair) == 4 else None,)

    if args.mix is not None:
        source = mix_source(args.mix, draw)
        if source == "shapes":
            return labelled(synth_pair(choice, grid, with_labels=True))
        if source == "cardiac":
            return labelled(cardiac_pair(anatomy_sets["cardiac"], choice, grid, augment=not args.no_augment))
        if source == "abdomen":
            return labelled(abdomen_pair(anatomy_sets["abdomen"], choice, grid, with_labels=True))
        # brain: the identical-pair share is a share of the brain steps, drawn next
        draw = args.synth_fraction + torch.rand(1, generator=choice).item()
    if draw < args.synth_fraction:
        return labelled(synth_pair(choice, grid, with_labels=True))
    brain_labels = with_labels and args.brain_labels > 0 and train_cache.labels is not None
    stripping = strips(args)  # main() loads the label maps (the masks) for it
    if stripping and train_cache.labels is None:
        raise ValueError("--strip-fraction and --strip-both-fraction need the cache's label maps "
                         "(SubjectCache(training_labels=True))")
    # whole_maps: the two full parcellations (the label subsets' source, the strip masks)
    fixed, moving, *whole_maps = sample_pair(train_cache, seed, step, augment=not args.no_augment,
                                             with_labels=brain_labels or stripping)
    maps = whole_maps if brain_labels else []
    if maps:
        subset = torch.Generator().manual_seed(seed * 1_000_003 + step + 1_300_000_000)
        maps = list(label_subset(maps[0], maps[1], args.brain_labels, subset) or ())
    if draw < args.synth_fraction + args.identity_fraction:
        return labelled((fixed, fixed.clone()) + ((maps[0], maps[0].clone()) if maps else ()))
    # Draws for later options come after the older ones, so old runs keep their pairs.
    if args.remap_fraction and torch.rand(1, generator=choice).item() < args.remap_fraction:
        curve = random_intensity_curve(choice)
        fixed, moving = apply_intensity_curve(fixed, curve), apply_intensity_curve(moving, curve)
    if args.thick_fraction:
        if torch.rand(1, generator=choice).item() < args.thick_fraction:
            fixed = thick_slices(fixed, choice)
        if torch.rand(1, generator=choice).item() < args.thick_fraction:
            moving = thick_slices(moving, choice)
    if args.strip_fraction and torch.rand(1, generator=choice).item() < args.strip_fraction:
        if torch.rand(1, generator=choice).item() < 0.5:
            fixed = skull_stripped(fixed, whole_maps[0])
        else:
            moving = skull_stripped(moving, whole_maps[1])
    if args.strip_both_fraction and torch.rand(1, generator=choice).item() < args.strip_both_fraction:
        fixed, moving = skull_stripped(fixed, whole_maps[0]), skull_stripped(moving, whole_maps[1])
    return labelled((fixed, moving) + tuple(maps))


def strips(args):
    """Whether brain pairs may be skull-stripped (the pairs then need their label maps as masks)."""
    return args.strip_fraction > 0 or args.strip_both_fraction > 0


def _ints(text):
    return [int(v) for v in text.split(",")]


def network_config(args):
    return {"architecture": "TwoStepNet", "coarse_channels": _ints(args.coarse_channels),
            "fine_channels": _ints(args.fine_channels), "grid": _ints(args.grid),
            "ncc_window": args.ncc_window, "gradicon_weight": args.gradicon_weight}


def learning_rate(args, step):
    """Linear warm-up, then cosine decay to a tenth of ``--lr`` at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def validation_pairs(count, subjects):
    """Up to ``count`` distinct ordered pairs (i, i + offset) of the validation subjects,
    deterministic; a single validation subject is paired with itself."""
    pairs = [(i, (i + offset) % subjects) for offset in range(1, subjects) for i in range(subjects)]
    return pairs[:count] or [(0, 0)]


@torch.no_grad()
def validate(network, val_cache, pairs, device):
    """Mean Dice of the validation pairs before and after registration, at the cache's full
    resolution: the displacement is upsampled as in ``fmsam.register``, and labels are warped by
    nearest neighbour there (on the coarse network grid, sub-voxel motion would not show)."""
    network.eval()
    registered, identity = [], []
    for first, second in pairs:
        fixed = val_cache.images[first:first + 1].to(device)
        moving = val_cache.images[second:second + 1].to(device)
        fixed_labels = val_cache.labels[first][0].numpy()
        moving_labels = val_cache.labels[second:second + 1].float()
        displacement = resize(network(fixed, moving).cpu(), fixed_labels.shape)
        warped_labels = warp(moving_labels, displacement, mode="nearest").long().numpy()
        common = labels_in_both(fixed_labels, moving_labels.numpy())
        registered.append(mean_dice(fixed_labels, warped_labels, common))
        identity.append(mean_dice(fixed_labels, moving_labels.long().numpy(), common))
    network.train()
    return float(np.mean(registered)), float(np.mean(identity))


@torch.no_grad()
def validate_abdomen(network, abdomen, pairs, grid, device):
    """Mean organ Dice of abdomen selection pairs (two different maps, whole field of view, rendered
    CT-like with a fixed palette per pair: ``anatomy.abdomen_validation_pair``) before and after
    registration. The maps are roughly aligned already (no affine); the displacement is upsampled to
    the maps' 2 mm grid and the moving map warped there by nearest neighbour, as :func:`validate`."""
    network.eval()
    registered, identity = [], []
    for index, (first, second) in enumerate(pairs):
        fixed, moving, fixed_labels, moving_labels = abdomen_validation_pair(abdomen, first, second, grid, index)
        fixed_labels, moving_labels = fixed_labels[0, 0].numpy(), moving_labels.float()
        if tuple(moving_labels.shape[2:]) != fixed_labels.shape:
            raise ValueError("abdomen validation needs maps of one size (%s, %s)"
                             % (fixed_labels.shape, tuple(moving_labels.shape[2:])))
        displacement = resize(network(fixed.to(device), moving.to(device)).float().cpu(), fixed_labels.shape)
        warped = warp(moving_labels, displacement, mode="nearest")[0, 0].long().numpy()
        moving_array = moving_labels[0, 0].long().numpy()
        common = labels_in_both(fixed_labels, moving_array)
        registered.append(mean_dice(fixed_labels, warped, common))
        identity.append(mean_dice(fixed_labels, moving_array, common))
    network.train()
    return float(np.mean(registered)), float(np.mean(identity))


@torch.no_grad()
def validate_cardiac(network, cardiac, keys, grid, window, device):
    """Label-free check on cardiac selection pairs (``anatomy.cardiac_validation_keys``): mean local
    NCC (``window``^3 boxes, 1 = identical) of the fixed stack and the moving one warped by the
    network, on the fixed stack's network grid, after and before registration (the moving stack
    presented as the engine would: centred translation, contrast matched when the engine would)."""
    network.eval()
    registered, identity = [], []
    for fixed_key, moving_key in keys:
        fixed, moving, _ = present_cardiac_pair(cardiac, fixed_key, moving_key, grid)
        fixed, moving = fixed.to(device), moving.to(device)
        displacement = network(fixed, moving).float()
        registered.append(1.0 - float(local_ncc_loss(fixed, warp(moving, displacement), window)))
        identity.append(1.0 - float(local_ncc_loss(fixed, moving, window)))
    network.train()
    return float(np.mean(registered)), float(np.mean(identity))


def load_anatomy(args, rank):
    """``(training sets, selection sets)`` for ``--mix``: dicts with ``"cardiac"``/``"abdomen"``
    (an ``anatomy.CardiacSet``/``AbdomenSet`` of the split's training or selection subjects). A
    training set is loaded when its share is positive (its data missing is an error); a selection set
    on rank 0 when its data folder exists (else its validation is skipped, with a message)."""
    if args.mix is None:
        return {}, {}
    splits = load_splits(args.splits or SPLITS_FILE)
    folders = {"cardiac": os.path.join(args.data, "cardiac_myops"),
               "abdomen": os.path.join(args.data, "abdomen_labels")}
    kinds = {"cardiac": CardiacSet, "abdomen": AbdomenSet}
    training, selection = {}, {}
    for source, folder in folders.items():
        if args.mix[source] > 0:
            training[source] = kinds[source](folder, splits[source]["training"])
        if rank == 0:
            if os.path.isdir(folder) and splits[source]["selection"]:
                selection[source] = kinds[source](folder, splits[source]["selection"])
            else:
                print("no %s selection set (%s): its validation is skipped" % (source, folder), flush=True)
    return training, selection


def initial_weights(path, config):
    """The network state in a weights file (``fmsam.weights`` format) or a training checkpoint,
    checked against this run's network options. The grid may differ: the network is fully
    convolutional, so fine-tuning on a finer grid starts from weights trained on a coarser one."""
    state, saved, _ = read_state(path)
    for key in ("architecture", "coarse_channels", "fine_channels"):
        if key in saved and saved[key] != config.get(key, saved[key]):
            raise SystemExit("error: --init %s has %s %s, this run %s" % (path, key, saved[key], config.get(key)))
    return state


def setup_distributed(args):
    """``(rank, world_size, device)``. Under ``torchrun`` (WORLD_SIZE > 1) this joins the process
    group: NCCL on GPUs (one per process, by LOCAL_RANK), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(args.device)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _agree(world, value, device):
    """The value rank 0 holds (an int), on every rank (no-op on one process)."""
    if world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def weights_identical_on_all_ranks(network, world, device):
    """True when every rank holds bit-identical weights (compared by a SHA-256 of the bytes)."""
    if world == 1:
        return True
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return all(int(other.item()) == int(mine.item()) for other in everyone)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    config = network_config(args)
    config_path = os.path.join(args.run, "config.json")
    run_settings = dict(vars(args), network=config, world_size=world)
    refused = 0
    if rank == 0:
        os.makedirs(args.run, exist_ok=True)
        if os.path.exists(config_path):
            with open(config_path) as handle:
                previous = json.load(handle)
            changed = [k for k in ("optimizer", "rho", "lr", "steps", "seed", "grid", "warmup",
                                   "coarse_channels", "fine_channels", "gradicon_weight", "no_augment",
                                   "synth_fraction", "identity_fraction", "thick_fraction",
                                   "remap_fraction", "init", "mix", "label_weight", "brain_labels",
                                   "strip_fraction", "strip_both_fraction")
                       if previous.get(k, DEFAULTS.get(k)) != run_settings.get(k)]
            if changed:
                print("error: %s was started with other settings (%s); use a new --run folder"
                      % (args.run, ", ".join(changed)), file=sys.stderr)
                refused = 1
        if not refused:
            with open(config_path, "w") as handle:
                json.dump(run_settings, handle, indent=1)
    if _agree(world, refused, device):
        return 2

    split = read_split(args.cache)
    grid = tuple(config["grid"])
    train_cache = SubjectCache(args.cache, split["train"], grid,
                               training_labels=args.brain_labels > 0 or strips(args))
    val_cache = SubjectCache(args.cache, split["val"], grid, with_labels=True) if rank == 0 else None
    pairs = validation_pairs(args.val_pairs, len(val_cache)) if rank == 0 else None
    anatomy_sets, selection_sets = load_anatomy(args, rank)
    abdomen_pairs = (validation_pairs(args.val_abdomen_pairs, len(selection_sets["abdomen"]))
                     if "abdomen" in selection_sets and args.val_abdomen_pairs > 0 else [])
    cardiac_keys = (cardiac_validation_keys(selection_sets["cardiac"].patients)[:max(0, args.val_cardiac_pairs)]
                    if "cardiac" in selection_sets else [])

    network = build_network(config).to(device)
    checkpoint_path = os.path.join(args.run, "latest.pt")
    if args.init and not os.path.exists(checkpoint_path):  # a resumed run has its own weights
        network.load_state_dict(initial_weights(args.init, config))
    model = network
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    base = torch.optim.Adam(network.parameters(), lr=args.lr)
    optimizer = SAM(network.parameters(), base, rho=args.rho, adaptive=args.optimizer == "asam") \
        if args.optimizer in ("sam", "asam") else None
    state_holder = optimizer if optimizer is not None else base

    log_path = os.path.join(args.run, "log.csv")
    step, best_dice = 0, -1.0
    if os.path.exists(checkpoint_path):
        weights, _, state = read_state(checkpoint_path)  # on the CPU; load_state_dict moves it
        network.load_state_dict(weights)
        state_holder.load_state_dict(state["optimizer"])
        step, best_dice = state["step"], state["best_dice"]
        if rank == 0:
            print("resumed %s at step %d" % (args.run, step), flush=True)
            _truncate_log(log_path, step)
    log_file = log = None
    if rank == 0:
        new_log = not os.path.exists(log_path)
        fields = LOG_FIELDS if new_log else _log_fields(log_path)  # a resumed older run keeps its columns
        log_file = open(log_path, "a", newline="")
        log = csv.DictWriter(log_file, fields, extrasaction="ignore")
        if new_log:
            log.writeheader()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")

    def pair_loss(fixed, moving, offset, labels=None):
        """(loss, similarity, regulariser, label overlap loss or None) of one pair."""
        with autocast:
            both = model(torch.cat([fixed, moving]), torch.cat([moving, fixed]))
        # The loss itself in float32: local NCC divides small differences of window sums.
        both = both.float()
        loss, similarity, regulariser = symmetric_registration_loss(
            fixed, moving, both[:1], both[1:], args.gradicon_weight, args.ncc_window, offset)
        if labels is None or not args.label_weight:
            return loss, similarity, regulariser, None
        overlap = label_overlap_loss(labels[0], labels[1], both[:1], both[1:])
        return loss + args.label_weight * overlap, similarity, regulariser, overlap

    started, start_step = time.time(), step
    network.train()
    while step < args.steps:
        tic = time.time()
        for group in base.param_groups:
            group["lr"] = learning_rate(args, step)
        fixed, moving, labels = draw_pair(args, train_cache, step, rank, grid, anatomy_sets, with_labels=True)
        fixed, moving = fixed.to(device), moving.to(device)
        if labels is not None:
            labels = tuple(label.to(device) for label in labels)
        offset = sampling_offset(args.seed, step, fixed.shape[2:])  # the pair's own grid
        if optimizer is not None:
            # SAM's ascent step uses each rank's own gradient (no all-reduce: m-sharpness, as in
            # Foret et al.); the descent gradient at the perturbed weights is averaged over ranks.
            with model.no_sync() if world > 1 else contextlib.nullcontext():
                loss, similarity, regulariser, overlap = pair_loss(fixed, moving, offset, labels)
                loss.backward()
            optimizer.perturb()  # same pair, augmentation and offset in both passes
            pair_loss(fixed, moving, offset, labels)[0].backward()
            optimizer.step(clip_norm=args.clip_norm)
        else:
            loss, similarity, regulariser, overlap = pair_loss(fixed, moving, offset, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), args.clip_norm)
            base.step()
            base.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            row = {"step": step, "loss": "%.6f" % loss.item(), "similarity": "%.6f" % similarity.item(),
                   "regulariser": "%.6f" % regulariser.item(), "lr": "%.3g" % learning_rate(args, step - 1),
                   "seconds": "%.3f" % (time.time() - tic), "val_dice": "", "val_dice_identity": "",
                   "source": step_source(args, step - 1, rank),
                   "label_overlap": "" if overlap is None else "%.6f" % overlap.item()}
            if step % args.val_every == 0 or step == args.steps:
                dice, dice_identity = validate(network, val_cache, pairs, device)
                row["val_dice"], row["val_dice_identity"] = "%.4f" % dice, "%.4f" % dice_identity
                if dice > best_dice:
                    best_dice = dice
                    save_checkpoint(os.path.join(args.run, "best.pt"), network, state_holder, step,
                                    best_dice, config)
                print("step %d  validation Dice %.4f (template-aligned %.4f)" % (step, dice, dice_identity),
                      flush=True)
                if abdomen_pairs:
                    after, before = validate_abdomen(network, selection_sets["abdomen"], abdomen_pairs, grid, device)
                    row["val_abdomen_dice"], row["val_abdomen_dice_identity"] = "%.4f" % after, "%.4f" % before
                    print("step %d  abdomen selection Dice %.4f (unregistered %.4f)" % (step, after, before),
                          flush=True)
                if cardiac_keys:
                    after, before = validate_cardiac(network, selection_sets["cardiac"], cardiac_keys, grid,
                                                     args.ncc_window, device)
                    row["val_cardiac_lncc"], row["val_cardiac_lncc_identity"] = "%.4f" % after, "%.4f" % before
                    print("step %d  cardiac selection LNCC %.4f (unregistered %.4f)" % (step, after, before),
                          flush=True)
            log.writerow(row)
            if step % args.checkpoint_every == 0 or step == args.steps:
                log_file.flush()
                save_checkpoint(checkpoint_path, network, state_holder, step, best_dice, config)
        elapsed = time.time() - started
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            per_step = elapsed / (step - start_step)
            print("step %d/%d  loss %.4f  sim %.4f  reg %.4f  %.2fs/step  ETA %.0f min"
                  % (step, args.steps, loss.item(), similarity.item(), regulariser.item(), per_step,
                     per_step * (args.steps - step) / 60), flush=True)
        out_of_time = int(bool(args.max_minutes and elapsed > args.max_minutes * 60 and step < args.steps))
        if _agree(world, out_of_time, device):  # rank 0's clock decides, so all ranks stop together
            if rank == 0:
                save_checkpoint(checkpoint_path, network, state_holder, step, best_dice, config)
                print("stopping after %.1f min at step %d; run again to resume" % (elapsed / 60, step))
            break
    if log_file is not None:
        log_file.close()
    status = 0
    if world > 1:
        import torch.distributed as dist

        if weights_identical_on_all_ranks(network, world, device):
            if rank == 0:
                print("weights identical on all %d ranks" % world, flush=True)
        else:
            print("error: rank %d holds weights that differ from another rank's" % rank, file=sys.stderr)
            status = 3
        # Leave together: a rank that tears gloo down while the other still talks to it can abort
        # the other one at exit (SIGABRT, "terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return status


def _log_fields(log_path):
    with open(log_path, newline="") as handle:
        return next(csv.reader(handle), None) or LOG_FIELDS


def _truncate_log(log_path, step):
    """Drop log rows written after the checkpoint, so a resumed run logs each step once."""
    if not os.path.exists(log_path):
        return
    fields = _log_fields(log_path)
    with open(log_path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    with open(log_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)


def script_arguments(argv):
    """The script's own arguments from ``sys.argv[1:]``: Slicer passes on what follows its
    ``--ignore-rest`` option; a leading ``--ignore-rest`` or ``--`` is dropped if it comes along."""
    return list(argv[1:]) if argv and argv[0] in ("--ignore-rest", "--") else list(argv)


def run_as_script(argv=None):
    """``python train.py ...`` or ``Slicer --no-main-window --python-script train.py --ignore-rest ...``:
    run :func:`main` and always end the process with a status code."""
    try:
        code = main(script_arguments(sys.argv[1:] if argv is None else argv))
    except SystemExit:  # argparse (--help: 0, bad arguments: 2) and explicit exits
        raise
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        code = 130
    except BaseException as error:  # anything else: say it, and exit non-zero instead of hanging Slicer
        traceback.print_exc()
        print("train.py: error: %s: %s" % (type(error).__name__, error), file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code or 0)


if __name__ == "__main__":
    run_as_script()
