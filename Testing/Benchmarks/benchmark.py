"""Side-by-side benchmark: fmsam (fast, accurate), ANTs SyN, elastix and SimpleITK demons.

Every method registers the same pairs; Dice (mean over labels present in both label maps), folding
(det J <= 0, from one Jacobian: ``fmsam.jacobian``, on each method's dense fixed-to-moving field)
and the registration's wall-clock seconds are written to ``OUT/results.csv``, one row per method
and pair. Runs are resumable: rows already in the CSV are skipped.

The classical baselines need packages that must not enter the project's environment (antspyx pins
NumPy < 2.4), so they run from a separate virtual environment, the fmsam rows from the project's:

    python3 -m venv ../bench-venv && ../bench-venv/bin/pip install antspyx==0.6.3 itk-elastix SimpleITK matplotlib
    ../bench-venv/bin/python Testing/Benchmarks/benchmark.py run --pairs PAIRS.csv --out DIR --methods syn,demons,elastix
    python3 Testing/Benchmarks/benchmark.py run --pairs PAIRS.csv --out DIR --methods fmsam-fast,fmsam-accurate
    python3 Testing/Benchmarks/benchmark.py report --out DIR

``report`` writes ``DIR/summary.md`` (a markdown table) and ``DIR/dice_vs_seconds.png``.
Threads: ``--threads`` (default 2, the machine's cores) for ITK and torch alike. ``--modality ct``
(or ``mr``) normalises the images of the methods that normalise them (affine, demons, fmsam) that way
instead of ``fmsam``'s automatic choice, as ``fmsam register --modality`` does; give such rows a
``--label`` (rendered abdomen pairs have no air, so ``auto`` takes them for MR). ``--set
MODULE.NAME=VALUE`` (repeatable, with ``--label``) changes a numeric constant of an ``fmsam``
module for this run's fmsam rows, e.g. ``--set inference.IO_IMAGE_SCALE=1.5`` (a diagnostic: the
engine's defaults are what a user gets).
"""
import argparse
import contextlib
import csv
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's engine, not an installed fmsam of another version (../bench-venv has none).
sys.path.insert(0, os.path.join(HERE, "..", "..", "Logic"))

from fmsam.options import MODES  # noqa: E402  (no torch, no SimpleITK: safe in any venv)

#: The methods that normalise the images as ``fmsam`` does (``--modality`` applies to them only).
NORMALISING = ("affine", "fmsam-fast", "fmsam-accurate", "demons")
FIELDS = ("method", "pair", "fixed", "moving", "dice", "folding_percent", "jacobian_min", "seconds")
METHODS = ("affine", "fmsam-fast", "fmsam-accurate", "syn", "elastix", "demons")


def read_pairs(path):
    from fmsam.evaluate import read_pairs as read

    return read(path)


def mean_dice_on_fixed(pair, warped_labels):
    """Mean Dice between the fixed label map and a warped label map (SimpleITK image on the fixed
    grid) over the labels present in both the fixed and the moving label maps: the definition
    ``fmsam evaluate`` uses, so a label a method loses counts as Dice 0."""
    import SimpleITK as sitk

    from fmsam.metrics import labels_in_both, mean_dice

    fixed = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_labels"]))
    moving = sitk.GetArrayFromImage(sitk.ReadImage(pair["moving_labels"]))
    return mean_dice(fixed, sitk.GetArrayFromImage(warped_labels), labels_in_both(fixed, moving))


def folding(field_lps, reference):
    from fmsam.jacobian import jacobian_determinant, jacobian_statistics

    stats = jacobian_statistics(jacobian_determinant(field_lps, reference))
    return stats["folding_percent"], stats["jacobian_min"]


# -- methods: each returns (seconds of registration, warped labels image, field (k,j,i,3) LPS) ----------

def run_fmsam(pair, io_steps, weights=None, modality="auto", cache={}):
    from fmsam.pipeline import register
    from fmsam.weights import load_model

    if cache.get("weights", "unset") != weights:
        cache["model"], cache["weights"] = load_model(weights), weights
    start = time.perf_counter()
    result = register(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"],
                      io_steps=io_steps, device="cpu", model=cache["model"], modality=modality)
    seconds = time.perf_counter() - start
    return seconds, result.warped_labels, result.field, result.fixed


def normalised_pair(pair, modality="auto"):
    """The pair's fixed and moving images normalised as ``fmsam.register`` normalises them
    (``modality``: 'auto', 'mr' or 'ct')."""
    from fmsam.imageio import load_scalar_volume
    from fmsam.intensity import normalised_image

    return [normalised_image(load_scalar_volume(pair[role]), modality)[0] for role in ("fixed", "moving")]


def run_affine(pair, modality="auto"):
    """fmsam's affine pre-alignment alone (the starting point every fmsam row improves on)."""
    import SimpleITK as sitk

    from fmsam import fields
    from fmsam.prealign import affine_prealign

    fixed, moving = normalised_pair(pair, modality)
    start = time.perf_counter()
    affine = affine_prealign(fixed, moving)
    seconds = time.perf_counter() - start
    warped_labels = fields.resample(sitk.ReadImage(pair["moving_labels"]), fixed, affine, nearest=True)
    return seconds, warped_labels, fields.compose_fixed_to_moving(fixed, affine), fixed


def run_syn(pair):
    import ants
    import SimpleITK as sitk

    fixed, moving = ants.image_read(pair["fixed"]), ants.image_read(pair["moving"])
    start = time.perf_counter()
    # antspyx 0.6.3 ignores a ``random_seed`` argument (it vanishes in **kwargs): its metric sampling is
    # seeded only through the global configuration.
    ants.config.set_ants_deterministic(True, 1)
    registration = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
    seconds = time.perf_counter() - start
    transforms = registration["fwdtransforms"]
    with tempfile.TemporaryDirectory() as folder:
        warped = ants.apply_transforms(fixed=ants.image_read(pair["fixed_labels"]),
                                       moving=ants.image_read(pair["moving_labels"]),
                                       transformlist=transforms, interpolator="nearestNeighbor")
        ants.image_write(warped, os.path.join(folder, "labels.nii.gz"))
        field_path = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                           compose=os.path.join(folder, "field_"))
        field = sitk.GetArrayFromImage(sitk.ReadImage(field_path))
        warped_labels = sitk.ReadImage(os.path.join(folder, "labels.nii.gz"))
    reference = sitk.ReadImage(pair["fixed"])
    return seconds, sitk.Cast(warped_labels, sitk.sitkUInt16), field, reference


def run_elastix(pair):
    import itk
    import numpy as np
    import SimpleITK as sitk

    fixed = itk.imread(pair["fixed"], itk.F)
    moving = itk.imread(pair["moving"], itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    start = time.perf_counter()
    _, result_parameters = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                           log_to_console=False)
    seconds = time.perf_counter() - start
    for index in range(result_parameters.GetNumberOfParameterMaps()):
        result_parameters.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
    moving_labels = itk.imread(pair["moving_labels"], itk.F)
    warped = itk.transformix_filter(moving_labels, result_parameters, log_to_console=False)
    with tempfile.TemporaryDirectory() as folder:  # transformix writes deformationField.nii there
        field = itk.transformix_deformation_field(moving, result_parameters, output_directory=folder)
        field = np.array(itk.array_from_image(field), dtype=np.float64)
    reference = sitk.ReadImage(pair["fixed"])
    warped_labels = sitk.GetImageFromArray(np.rint(itk.array_from_image(warped)).astype(np.uint16))
    warped_labels.CopyInformation(reference)
    return seconds, warped_labels, field, reference


#: Demons pyramid, coarse to fine: (shrink factor, iterations) per level.
DEMONS_LEVELS = ((4, 60), (2, 40), (1, 20))
#: Gaussian smoothing of the demons displacement field, in voxels of the finest axis (see
#: :func:`demons_level_settings`).
DEMONS_SIGMA = 1.5
#: Longest demons update per iteration, in voxels of the finest axis (see :func:`demons_level_settings`).
DEMONS_STEP = 0.5


def demons_level_settings(image, shrink):
    """``(shrink factors, field smoothing sigmas in voxels, maximum update step length)``, one factor
    and sigma per axis (x, y, z), of the demons level ``shrink`` on ``image`` (the full-resolution
    fixed image). On isotropic images large enough for the pyramid (every brain here) this is
    ``[shrink] * 3``, ``[DEMONS_SIGMA] * 3`` and ``DEMONS_STEP``, exactly the values the demons
    always ran with. Thin anisotropic stacks (cardiac short axis: 2-6 slices 12-23 mm thick, 0.7 mm
    in plane) need three changes, all in the finest axis' voxels so that isotropic images are left
    as they were:

    * Shrink factors: an axis is shrunk at most to ``shrink`` times the finest spacing (a 12 mm
      slice axis already is coarser than 4 x 0.7 mm and is not shrunk) and keeps at least 2 voxels
      (``size // 2``). ``sitk.Shrink(image, [4] * 3)`` of a 3-slice stack left 0 slices.
    * Smoothing: ``SetStandardDeviations`` is in voxels whatever ``UseImageSpacing`` says. SimpleITK
      documents the values as "set with respect to pixel coordinates", and ITK's
      ``PDEDeformableRegistrationFilter::SmoothDisplacementField`` builds a ``GaussianOperator`` of
      variance sigma^2 along each axis with no spacing in it (``UseImageSpacing`` only reaches the
      image gradients of the demons force). 1.5 voxels along a 12-23 mm slice axis would average
      each slice's displacement with its neighbours' 18-35 mm away, which on 3-6 slices is most of
      the stack. Each axis gets the same physical sigma instead, 1.5 voxels of the finest axis of
      the level (1.5 x 0.73 mm = 1.1 mm at full resolution, 0.09 slice of 12 mm: slices are hardly
      mixed; at the 4x level 1.5 x 2.9 mm, 0.36 slice).
    * Update step: ITK's ESM demons function bounds an update by ``MaximumUpdateStepLength`` times
      the root mean square of the spacings (its normaliser is mean(spacing^2) x step^2); on a
      0.73 x 0.73 x 12 mm grid that is 0.5 x 6.95 mm = 3.5 mm, 4.8 in-plane voxels per iteration
      instead of half a voxel. The step is scaled by finest spacing / RMS spacing, so that the bound
      is half a voxel of the finest axis again.

    Measured on cardiac *selection* patients only (101_C0<-101_DE, 102_C0<-102_T2, 111_DE<-111_C0,
    103_DE<-104_DE): these settings folded nowhere (min det J 0.10 to 0.14) and raised the NMI over
    identity by 0.028 to 0.055; the plain clamp (sigma 1.5 voxels on every axis, step 0.5) folded
    on 3 of the 4 (up to 0.075 %, min det J -0.49) for an NMI higher by at most 0.021; the physical
    sigma with the unscaled step folded on all 4 (up to 1.5 %, min det J -4.1).
    """
    spacing = list(image.GetSpacing())
    finest = min(spacing)
    factors = [int(max(1, min(shrink, size // 2, round(shrink * finest / sp))))
               for size, sp in zip(image.GetSize(), spacing)]
    level_spacing = [sp * factor for sp, factor in zip(spacing, factors)]
    level_finest = min(level_spacing)
    # Ratios first (x / x is exactly 1.0): isotropic images get exactly DEMONS_SIGMA and DEMONS_STEP.
    ratios = [level_finest / sp for sp in level_spacing]
    sigmas = [DEMONS_SIGMA * ratio for ratio in ratios]
    step = DEMONS_STEP / math.sqrt(sum((1.0 / ratio) ** 2 for ratio in ratios) / len(ratios))
    return factors, sigmas, step


def demons_registration(fixed, moving):
    """fmsam's affine pre-alignment, then SimpleITK diffeomorphic demons on the affinely aligned pair
    (3 levels, :data:`DEMONS_LEVELS`; histogram matching), composed into one fixed-to-moving transform
    ``x -> affine(x + d(x))``. ``fixed`` and ``moving``: normalised float32 images (e.g.
    :func:`normalised_pair`). Per-level shrink factors, smoothing and step: :func:`demons_level_settings`.

    Returns ``(composite transform, dense field (k, j, i, 3) LPS mm on the fixed grid, seconds)``;
    the seconds cover the affine, the demons and the dense field. The one demons implementation of
    the benchmarks (``benchmark.py``'s and ``cardiac_benchmark.py``'s ``demons``)."""
    import SimpleITK as sitk

    from fmsam.fields import dense_field
    from fmsam.prealign import affine_prealign

    start = time.perf_counter()
    affine = affine_prealign(fixed, moving)
    aligned = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    aligned = sitk.HistogramMatching(aligned, fixed, 256, 7, True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    field = None
    for shrink, iterations in DEMONS_LEVELS:
        factors, sigmas, step = demons_level_settings(fixed, shrink)
        level_fixed = sitk.Shrink(fixed, factors) if max(factors) > 1 else fixed
        level_moving = sitk.Shrink(aligned, factors) if max(factors) > 1 else aligned
        initial = (sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64, 3) if field is None else
                   sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64))
        initial.CopyInformation(level_fixed)
        demons.SetStandardDeviations(sigmas)
        demons.SetMaximumUpdateStepLength(step)
        demons.SetNumberOfIterations(iterations)
        field = demons.Execute(level_fixed, level_moving, initial)
    deformable = sitk.DisplacementFieldTransform(sitk.Image(field))
    composite = sitk.CompositeTransform([affine, deformable])  # applied last-first: x -> affine(x + d(x))
    dense = dense_field(composite, fixed)
    return composite, dense, time.perf_counter() - start


def run_demons(pair, modality="auto"):
    """:func:`demons_registration` of the pair normalised as ``fmsam`` normalises it."""
    import SimpleITK as sitk

    fixed, moving = normalised_pair(pair, modality)
    composite, dense, seconds = demons_registration(fixed, moving)
    warped_labels = sitk.Resample(sitk.ReadImage(pair["moving_labels"]), fixed, composite,
                                  sitk.sitkNearestNeighbor, 0)
    return seconds, warped_labels, dense, fixed


RUNNERS = {
    "fmsam-fast": lambda pair, **options: run_fmsam(pair, 0, **options),
    "fmsam-accurate": lambda pair, **options: run_fmsam(pair, MODES["accurate"], **options),
    "affine": run_affine,
    "syn": run_syn,
    "elastix": run_elastix,
    "demons": run_demons,
}


def done_rows(path):
    if not os.path.isfile(path):
        return set()
    with open(path, newline="") as handle:
        return {(row["method"], row["pair"]) for row in csv.DictReader(handle)}


@contextlib.contextmanager
def appending_results(out, fields):
    """``(write(row), {(method, pair) already in it})`` for ``OUT/results.csv`` with columns
    ``fields``: created with its header when missing, appended to otherwise, so that a run resumes
    where the last one stopped; every row is flushed as it is written."""
    os.makedirs(out, exist_ok=True)
    results = os.path.join(out, "results.csv")
    finished = done_rows(results)
    new_file = not os.path.isfile(results)
    with open(results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        if new_file:
            writer.writeheader()

        def write(row):
            writer.writerow(row)
            handle.flush()

        yield write, finished


def engine_constants(settings, module=None):
    """Set numeric constants of ``fmsam`` modules, in this process, from ``MODULE.NAME=VALUE``
    strings (``NAME=VALUE`` when ``module`` names the module, e.g. 'slice_refinement'); each value
    of its constant's type (int or float; booleans and other types are refused). Returns
    ``{NAME or MODULE.NAME: value}`` as given. A setting that does not fit raises SystemExit with one
    line."""
    import importlib

    changed = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        where, _, name = key.rpartition(".") if module is None else (module, ".", key)
        try:
            target = importlib.import_module("fmsam." + where) if where.isidentifier() else None
            current = getattr(target, name, None)
            if not name.isupper() or isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ValueError(name)
            changed[key] = float(value) if isinstance(current, float) else int(value)
        except (ValueError, ImportError):
            raise SystemExit("--set takes %s=VALUE with NAME a number of %s (and VALUE one of its type), not %r"
                             % ("NAME" if module else "MODULE.NAME", "fmsam." + module if module else
                                "the fmsam module MODULE", setting)) from None
        setattr(target, name, changed[key])
    return changed


def labelled_engine_constants(settings, label):
    """``run --set``: the constants set in this process (:func:`engine_constants`) and printed, once a
    ``label`` keeps their rows apart from the engine's defaults; nothing without settings."""
    if settings:
        if not label:
            raise SystemExit("--set needs --label, so that its rows are not taken for the engine's defaults")
        print("fmsam rows with %s" % engine_constants(settings), flush=True)


def run(args):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    methods = args.methods.split(",")
    suffix = "[%s]" % args.label if args.label else ""
    unknown = [method for method in methods if method not in RUNNERS]
    if unknown:
        raise SystemExit("unknown method(s) %s; choose from %s" % (unknown, ", ".join(METHODS)))
    labelled_engine_constants(args.set, args.label)
    if any(method.startswith("fmsam") for method in methods):
        import torch
        torch.set_num_threads(args.threads)
    pairs = read_pairs(args.pairs)[: args.limit or None]
    with appending_results(args.out, FIELDS) as (write, finished):
        for method in methods:
            for number, pair in enumerate(pairs):
                key = "%03d" % number
                if (method + suffix, key) in finished:
                    continue
                options = {"weights": args.weights} if method.startswith("fmsam") else {}
                if method in NORMALISING:
                    options["modality"] = args.modality
                seconds, warped_labels, field, reference = RUNNERS[method](pair, **options)
                folding_percent, jacobian_min = folding(field, reference)
                row = {"method": method + suffix, "pair": key, "fixed": os.path.basename(pair["fixed"]),
                       "moving": os.path.basename(pair["moving"]),
                       "dice": round(mean_dice_on_fixed(pair, warped_labels), 5),
                       "folding_percent": round(folding_percent, 5), "jacobian_min": round(jacobian_min, 4),
                       "seconds": round(seconds, 2)}
                write(row)
                print("%-15s %s  Dice %.3f  folding %.4f %%  %.1f s" % (
                    method + suffix, key, row["dice"], row["folding_percent"], row["seconds"]), flush=True)


def _table(rows, methods, pairs_of):
    import numpy as np

    lines = ["| method | pairs | mean Dice | std | folding % (mean / max) | min det J | seconds per pair |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for method in methods:
        chosen = [row for row in rows if row["method"] == method and row["pair"] in pairs_of(method)]
        dice = np.array([float(row["dice"]) for row in chosen])
        fold = np.array([float(row["folding_percent"]) for row in chosen])
        seconds = np.array([float(row["seconds"]) for row in chosen])
        minimum = min(float(row["jacobian_min"]) for row in chosen)
        summary[method] = (dice.mean(), seconds.mean())
        lines.append("| %s | %d | %.4f | %.3f | %.4f / %.4f | %.3f | %.1f |" % (
            method, len(chosen), dice.mean(), dice.std(), fold.mean(), fold.max(), minimum, seconds.mean()))
    return lines, summary


def report(args):
    with open(os.path.join(args.out, "results.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    if args.methods:  # these, in this order (a results file keeps every method and model it ran)
        methods = [method for method in args.methods.split(",") if method in methods]
    pair_sets = {method: {row["pair"] for row in rows if row["method"] == method} for method in methods}
    lines, summary = _table(rows, methods, lambda method: pair_sets[method])
    text = "\n".join(lines) + "\n"
    common = set.intersection(*pair_sets.values())
    if any(pairs != common for pairs in pair_sets.values()):
        common_lines, _ = _table(rows, methods, lambda method: common)
        text += "\nOn the %d pairs every method finished:\n\n" % len(common) + "\n".join(common_lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(text)
    print(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    for method, (dice, seconds) in summary.items():
        axes.scatter(seconds, dice, s=40)
        axes.annotate(method, (seconds, dice), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks([1, 2, 5, 10, 20, 50])
    axes.set_xlabel("seconds per pair (as run: see --threads)")
    axes.set_ylabel("mean Dice")
    axes.set_title(args.title or os.path.basename(os.path.normpath(args.out)), fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    # Labels of the slowest methods run past the axes; the tight box keeps them in the picture.
    figure.savefig(os.path.join(args.out, "dice_vs_seconds.png"), dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--pairs", required=True)
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--methods", default=",".join(METHODS))
    run_parser.add_argument("--threads", type=int, default=2)
    run_parser.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all)")
    run_parser.add_argument("--weights", help="fmsam weights file (default: the bundled model)")
    run_parser.add_argument("--label", help="suffix for the method name, e.g. adam -> fmsam-fast[adam]")
    run_parser.add_argument("--modality", choices=("auto", "mr", "ct"), default="auto",
                            help="normalisation of affine, demons and fmsam (default: fmsam's automatic choice)")
    run_parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                            help="a numeric constant of an fmsam module for the fmsam rows, e.g. "
                                 "inference.IO_IMAGE_SCALE=1.5 (repeatable; needs --label)")
    report_parser = commands.add_parser("report")
    report_parser.add_argument("--out", required=True)
    report_parser.add_argument("--title")
    report_parser.add_argument("--methods", help="comma-separated methods to show, in order (default: all)")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
