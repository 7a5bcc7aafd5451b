"""Cardiac benchmark (issue 14): thin short-axis stacks, label-free measures.

Pairs come from ``../shared/data/cardiac_myops`` (MyoPS, 2-6 slices 12-23 mm thick, 0.7 mm in plane)
and a patient split: issue 14's ``cardiac_split.json`` (``pairs --set report``), or a role of issue
15's ``data_splits.json`` (``pairs --splits Testing/Benchmarks/data_splits.json --role report``; half of
issue 14's report patients train there). Tune on ``selection`` patients only, report on ``report``
patients. Two kinds of pair:

* ``inter``: two patients, one sequence (bSSFP ``C0``, LGE ``DE`` or ``T2``, taken in turn);
  patient n (fixed) with patient n+1 (moving) of the split's list, the last with the first.
* ``cross``: one patient, two sequences (C0->DE, DE->T2, T2->C0, C0->T2, DE->C0, T2->DE in turn).

Measures, all on the fixed image's grid and without labels (the data has none):

* ``exit``: the exit code of ``fmsam register``; for ANTs 1 when ``ants.registration`` raised
  (SyN fails on some 3-slice stacks), for demons 1 when SimpleITK raised, else 0. A failed run has
  no other measure.
* ``nmi``: normalised mutual information (:func:`fmsam.quality.normalised_mutual_information`,
  32 bins) of the fixed image and the moving image as the method resampled it (linear, 0 outside
  the moving image), both normalised as ``fmsam`` normalises MR (0.5th-99.5th percentile to [0, 1]),
  over the fixed image's foreground (normalised intensity above 0.05), every voxel.
* ``folding``: percent of fixed voxels with det J <= 0 of the method's fixed-to-moving field, from
  one Jacobian (``fmsam.jacobian``) for every method.
* ``seconds``: wall clock of the registration itself (``fmsam``: the report's ``seconds.total``).

Methods: ``identity`` (no registration: the moving image resampled in scanner space), ``fmsam-fast``
and ``fmsam-accurate`` (``fmsam register`` in a subprocess, ``fmsam.options.MODES["accurate"]`` steps for accurate),
``ants-affine`` and ``ants-syn`` (antspyx ``type_of_transform="Affine"`` / ``"SyN"``, Mattes MI,
seeded with ``ants.config.set_ants_deterministic(True, 1)``), which need the separate environment (antspyx pins NumPy < 2.4),
and ``demons`` (``benchmark.py``'s: fmsam's affine pre-alignment, then SimpleITK diffeomorphic demons
with per-axis levels for thin stacks, :func:`benchmark.demons_registration`; any environment with
SimpleITK)::

    python3 Testing/Benchmarks/cardiac_benchmark.py pairs --set report --out out/cardiac/report_pairs.csv
    python3 Testing/Benchmarks/cardiac_benchmark.py run --pairs out/cardiac/report_pairs.csv \
        --out out/cardiac/report --methods identity,fmsam-fast,fmsam-accurate,demons
    ../venv-ants/bin/python Testing/Benchmarks/cardiac_benchmark.py run --pairs out/cardiac/report_pairs.csv \
        --out out/cardiac/report_ants --methods ants-affine,ants-syn
    python3 Testing/Benchmarks/cardiac_benchmark.py report --out out/cardiac/report --also out/cardiac/report_ants

Rows already in ``OUT/results.csv`` are skipped (resumable). ``--threads`` (default 1) for ITK and torch.
``run --slice-refinement auto --label slices`` runs them with each slice refined in plane
(``fmsam.slice_refinement``). ``run --weights FILE --label NAME`` runs the fmsam methods with another model (``fmsam register
--weights``, with ``--allow-unverified-weights`` when FILE has no FILE.sha256 beside it); their rows
read e.g. ``fmsam-fast[NAME]`` and ``report`` lists them after the bundled model's.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LOGIC = os.path.join(ROOT, "Logic")
# This checkout's engine, not an installed fmsam of another version (../venv-ants has none).
sys.path.insert(0, LOGIC)

from benchmark import appending_results, labelled_engine_constants  # noqa: E402  (this folder is on sys.path: the script's own)
from fmsam.options import DEFAULT_SLICE_REFINEMENT, MODES, SLICE_REFINEMENT  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "cardiac_myops")
SPLIT = os.path.join(HERE, "cardiac_split.json")

FIELDS = ("method", "pair", "kind", "fixed", "moving", "exit", "nmi", "folding_percent", "jacobian_min",
          "seconds")
METHODS = ("identity", "fmsam-fast", "fmsam-accurate", "ants-affine", "ants-syn", "demons")
SEQUENCES = ("C0", "DE", "T2")
CROSS = (("C0", "DE"), ("DE", "T2"), ("T2", "C0"), ("C0", "T2"), ("DE", "C0"), ("T2", "DE"))
FOREGROUND = 0.05


def make_pairs(patients, data=DATA, pair_set=1):
    """Rows ``{kind, fixed, moving}`` (absolute paths): one inter-patient and one cross-sequence
    pair per patient, in the order of ``patients``: each patient's image against the next patient's
    in one sequence (the sequences in turn), and against its own in another sequence.

    ``pair_set`` 2 and 3: further sets from the same patients, for choosing again without reusing
    pairs already chosen with; no set shares a pair of images with another (either way round).
    Set 2: each patient against the one two places after it, the sequences one further along, and
    the cross-sequence combinations three further along :data:`CROSS` (always another two of a
    patient's sequences). Set 3: the patient three places after, the sequences two further along,
    and the one combination of a patient's sequences that sets 1 and 2 leave out (its first
    ordering in :data:`CROSS` from the patient's place on). Set 2 needs at least 5 patients, set 3
    at least 7: with fewer, inter-patient rows pair the same two patients as an earlier set (or
    twice, or a patient with itself); fewer raise ValueError. The images are the same patients' in
    every set, so the sets are not independent of one another."""
    if pair_set not in (1, 2, 3):
        raise ValueError("pair_set is 1, 2 or 3, not %r" % (pair_set,))
    least = {1: 1, 2: 5, 3: 7}[pair_set]
    if len(patients) < least:
        raise ValueError("pair set %d needs at least %d patients, not %d" % (pair_set, least, len(patients)))
    rows = []
    step, shift = pair_set, pair_set - 1
    for n, patient in enumerate(patients):
        other = patients[(n + step) % len(patients)]
        sequence = SEQUENCES[(n + shift) % 3]
        rows.append({"kind": "inter", "fixed": os.path.join(data, "%d_%s.nii.gz" % (patient, sequence)),
                     "moving": os.path.join(data, "%d_%s.nii.gz" % (other, sequence))})
    for n, patient in enumerate(patients):
        if pair_set < 3:
            fixed, moving = CROSS[(n + 3 * shift) % len(CROSS)]
        else:  # the pair of sequences sets 1 and 2 (shifts 0 and 1) leave out, first ordering from n on
            earlier = {frozenset(CROSS[(n + 3 * s) % len(CROSS)]) for s in (0, 1)}
            start = n % len(CROSS)
            fixed, moving = next(pair for pair in CROSS[start:] + CROSS[:start] if frozenset(pair) not in earlier)
        rows.append({"kind": "cross", "fixed": os.path.join(data, "%d_%s.nii.gz" % (patient, fixed)),
                     "moving": os.path.join(data, "%d_%s.nii.gz" % (patient, moving))})
    return rows


def normalised_array(image):
    import SimpleITK as sitk

    from fmsam.intensity import normalise

    return normalise(sitk.GetArrayFromImage(image), "mr")[0]


def nmi_on_fixed(fixed, warped):
    """NMI of two SimpleITK images on the fixed grid over the fixed image's foreground."""
    from fmsam.quality import normalised_mutual_information

    fixed_values, warped_values = normalised_array(fixed), normalised_array(warped)
    inside = fixed_values > FOREGROUND
    return normalised_mutual_information(fixed_values[inside], warped_values[inside])


def folding(field_lps, reference):
    from fmsam.jacobian import jacobian_determinant, jacobian_statistics

    stats = jacobian_statistics(jacobian_determinant(field_lps, reference))
    return stats["folding_percent"], stats["jacobian_min"]


# -- methods: each returns (exit code, seconds, warped moving on the fixed grid, field (k,j,i,3) LPS) --

def run_identity(pair, threads):
    import numpy as np
    import SimpleITK as sitk

    fixed, moving = sitk.ReadImage(pair["fixed"]), sitk.ReadImage(pair["moving"])
    warped = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return 0, 0.0, warped, np.zeros(sitk.GetArrayViewFromImage(fixed).shape + (3,))


#: Runs ``fmsam`` with engine constants set first: argv[1] the JSON list of ``MODULE.NAME=VALUE``
#: (:func:`benchmark.engine_constants`), the rest ``fmsam``'s own arguments.
WITH_CONSTANTS = ("import json, sys; sys.path.insert(0, %r); from benchmark import engine_constants; "
                  "engine_constants(json.loads(sys.argv[1])); from fmsam.cli import run_and_exit; "
                  "run_and_exit(sys.argv[2:])" % HERE)


def fmsam_command(pair, out, io_steps, weights=None, slice_refinement=DEFAULT_SLICE_REFINEMENT, settings=()):
    """The ``fmsam register`` command line of a pair (outputs into folder ``out``); ``weights``: a
    weights file instead of the bundled model, allowed unverified when it has no ``.sha256``;
    ``slice_refinement``: ``fmsam register --slice-refinement``; ``settings``: engine constants
    ``MODULE.NAME=VALUE`` set in that process before it registers (``run --set``)."""
    start = [sys.executable, "-c", WITH_CONSTANTS, json.dumps(list(settings))] if settings else \
        [sys.executable, "-m", "fmsam.cli"]
    command = start + ["register", pair["fixed"], pair["moving"],
               "--out", out, "--device", "cpu", "--quiet", "--io-steps", str(io_steps),
               "--slice-refinement", slice_refinement]
    if weights:
        command += ["--weights", weights]
        if not os.path.isfile(weights + ".sha256"):
            command.append("--allow-unverified-weights")
    return command


def run_fmsam(pair, threads, io_steps, weights=None, slice_refinement=DEFAULT_SLICE_REFINEMENT, settings=()):
    import SimpleITK as sitk

    from fmsam.fields import dense_field

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "out")
        environment = dict(os.environ, PYTHONPATH=LOGIC, OMP_NUM_THREADS=str(threads),
                           ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
        command = fmsam_command(pair, out, io_steps, weights, slice_refinement, settings)
        finished = subprocess.run(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  universal_newlines=True)
        if finished.returncode != 0:
            print(finished.stdout[-2000:], file=sys.stderr)
            return finished.returncode, float("nan"), None, None
        report = json.load(open(os.path.join(out, "report.json")))
        warped = sitk.ReadImage(os.path.join(out, "warped.nii.gz"), sitk.sitkFloat32)
        field = dense_field(sitk.ReadTransform(os.path.join(out, "transform.h5")), warped)
        return 0, report["seconds"]["total"], warped, field


def run_ants(pair, threads, kind):
    import ants
    import SimpleITK as sitk

    fixed, moving = ants.image_read(pair["fixed"]), ants.image_read(pair["moving"])
    start = time.perf_counter()
    try:
        # antspyx 0.6.3 ignores ``random_seed=`` (swallowed by **kwargs; figures before 2026-12-02
        # evening were unseeded): the metric's sampling is seeded through its global configuration.
        ants.config.set_ants_deterministic(True, 1)
        registration = ants.registration(fixed=fixed, moving=moving, type_of_transform=kind)
    except RuntimeError as error:  # SyN ends in "Registration failed with error code 1" on 3-slice stacks
        print("%s failed: %s" % (kind, error), file=sys.stderr)
        return 1, time.perf_counter() - start, None, None
    seconds = time.perf_counter() - start
    transforms = registration["fwdtransforms"]
    with tempfile.TemporaryDirectory() as folder:
        warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                       interpolator="linear")
        ants.image_write(warped, os.path.join(folder, "warped.nii.gz"))
        field_path = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                           compose=os.path.join(folder, "field_"))
        field = sitk.GetArrayFromImage(sitk.ReadImage(field_path))
        warped = sitk.ReadImage(os.path.join(folder, "warped.nii.gz"), sitk.sitkFloat32)
    return 0, seconds, warped, field


def run_demons(pair, threads):
    """``benchmark.py``'s demons (:func:`benchmark.demons_registration`: fmsam's affine, then
    SimpleITK diffeomorphic demons, per-axis levels for thin stacks) on the pair normalised as
    ``fmsam`` normalises MR; the moving image as read is resampled through the composite transform."""
    import SimpleITK as sitk

    from benchmark import demons_registration, normalised_pair

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed, moving = normalised_pair(pair, "mr")
    start = time.perf_counter()
    try:
        composite, field, seconds = demons_registration(fixed, moving)
    except RuntimeError as error:  # an ITK exception: a failed run (exit 1), as for ANTs
        print("demons failed: %s" % error, file=sys.stderr)
        return 1, time.perf_counter() - start, None, None
    warped = sitk.Resample(sitk.ReadImage(pair["moving"]), fixed, composite, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    return 0, seconds, warped, field


RUNNERS = {
    "identity": run_identity,
    "fmsam-fast": lambda pair, threads, weights=None, slices=DEFAULT_SLICE_REFINEMENT, settings=(): run_fmsam(
        pair, threads, 0, weights, slices, settings),
    "fmsam-accurate": lambda pair, threads, weights=None, slices=DEFAULT_SLICE_REFINEMENT, settings=(): run_fmsam(
        pair, threads, MODES["accurate"], weights, slices, settings),
    "ants-affine": lambda pair, threads: run_ants(pair, threads, "Affine"),
    "ants-syn": lambda pair, threads: run_ants(pair, threads, "SyN"),
    "demons": run_demons,
}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def split_patients(splits=None, role=None, issue14_set=None):
    """MyoPS patient IDs (int), in the split file's order: ``role`` of the ``cardiac`` entry of an
    issue-15 split file (``data_splits.json``), or else ``issue14_set`` of ``cardiac_split.json``."""
    if splits:
        with open(splits) as handle:
            return json.load(handle)["cardiac"][role]
    with open(SPLIT) as handle:
        return json.load(handle)[issue14_set]


def pairs_command(args):
    rows = make_pairs(split_patients(args.splits, args.role, args.set), pair_set=args.pair_set)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ("kind", "fixed", "moving"))
        writer.writeheader()
        writer.writerows(rows)
    print("%d pairs -> %s" % (len(rows), args.out))


def method_name(method, label):
    """The results' name of a method: an fmsam method run with ``--label NAME`` is ``method[NAME]``."""
    return "%s[%s]" % (method, label) if label and method.startswith("fmsam") else method


def run_command(args):
    import SimpleITK as sitk

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in RUNNERS]
    if unknown:
        raise SystemExit("unknown method(s) %s; choose from %s" % (unknown, ", ".join(METHODS)))
    labelled_engine_constants(args.set, args.label)  # checked here, set again in each fmsam process
    pairs = read_csv(args.pairs)[: args.limit or None]
    only = {int(key) for key in args.only.split(",")} if args.only else None
    with appending_results(args.out, FIELDS) as (write, finished):
        for method in methods:
            for number, pair in enumerate(pairs):
                key, name = "%03d" % number, method_name(method, args.label)
                if (name, key) in finished or (only is not None and number not in only):
                    continue
                if method.startswith("fmsam"):
                    code, seconds, warped, field = RUNNERS[method](pair, args.threads, args.weights,
                                                                   args.slice_refinement, args.set)
                else:
                    code, seconds, warped, field = RUNNERS[method](pair, args.threads)
                fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
                row = {"method": name, "pair": key, "kind": pair["kind"],
                       "fixed": os.path.basename(pair["fixed"]), "moving": os.path.basename(pair["moving"]),
                       "exit": code, "seconds": round(seconds, 2)}
                if code == 0:
                    fold, jacobian_min = folding(field, fixed)
                    row.update(nmi=round(nmi_on_fixed(fixed, warped), 5), folding_percent=round(fold, 5),
                               jacobian_min=round(jacobian_min, 4))
                write(row)
                print("%-14s %s %-5s %s <- %s exit %d NMI %s folding %s %% %.1f s" % (
                    name, key, pair["kind"], row["fixed"], row["moving"], code, row.get("nmi"),
                    row.get("folding_percent"), seconds), flush=True)


def ordered_methods(names):
    """Method names in :data:`METHODS` order, each labelled model (``fmsam-fast[NAME]``) after its
    method, labels alphabetically."""
    return sorted(names, key=lambda name: (METHODS.index(name.split("[")[0]), name))


def report_command(args):
    import numpy as np

    rows = []
    for folder in [args.out] + (args.also or []):  # e.g. the ANTs rows, run from another environment
        rows += read_csv(os.path.join(folder, "results.csv"))
    methods = ordered_methods({row["method"] for row in rows})
    by = {(row["method"], row["pair"]): row for row in rows}
    pairs = sorted({row["pair"] for row in rows})
    kinds = {row["pair"]: row["kind"] for row in rows}
    lines = ["| pairs | method | pairs run | exit 0 | mean NMI (exit 0) | mean NMI, a failed run as identity "
             "| NMI at least the best of identity and ANTs | folding % (mean / max) | min det J "
             "| seconds per pair (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    baselines = [m for m in ("identity", "ants-affine", "ants-syn") if m in methods]
    for kind in ("inter", "cross"):
        chosen = [p for p in pairs if kinds[p] == kind]
        for method in methods:
            found = [by[(method, p)] for p in chosen if (method, p) in by]
            ok = [row for row in found if row["exit"] == "0"]
            if not found:
                continue
            nmi = np.array([float(row["nmi"]) for row in ok]) if ok else np.array([np.nan])
            fold = np.array([float(row["folding_percent"]) for row in ok]) if ok else np.array([np.nan])
            wins = "-"
            if method.startswith("fmsam") and baselines:
                better = 0
                for row in ok:
                    best = max(float(by[(b, row["pair"])]["nmi"]) for b in baselines
                               if (b, row["pair"]) in by and by[(b, row["pair"])]["exit"] == "0")
                    better += float(row["nmi"]) >= best
                wins = "%d of %d" % (better, len(found))
            as_identity = [float(row["nmi"]) if row["exit"] == "0" else float(by[("identity", row["pair"])]["nmi"])
                           for row in found if row["exit"] == "0" or ("identity", row["pair"]) in by]
            lines.append("| %s | %s | %d | %d | %.4f | %.4f | %s | %.4f / %.4f | %.3f | %.1f |" % (
                kind, method, len(found), len(ok), np.nanmean(nmi), np.mean(as_identity), wins,
                np.nanmean(fold), np.nanmax(fold),
                min(float(row["jacobian_min"]) for row in ok) if ok else float("nan"),
                np.mean([float(row["seconds"]) for row in ok]) if ok else float("nan")))
    text = "\n".join(lines) + "\n"
    open(os.path.join(args.out, "summary.md"), "w").write(text)
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pairs_parser = sub.add_parser("pairs", help="write the pair list of a split set")
    split = pairs_parser.add_mutually_exclusive_group(required=True)
    split.add_argument("--set", choices=("selection", "report"), help="a set of issue 14's cardiac_split.json")
    split.add_argument("--splits", help="an issue-15 split file (data_splits.json): pairs of its cardiac --role")
    pairs_parser.add_argument("--role", choices=("selection", "report"), help="with --splits")
    which = pairs_parser.add_mutually_exclusive_group()
    which.add_argument("--pair-set", type=int, choices=(1, 2, 3), default=1,
                       help="which pair set of the patients (2 and 3 share no pair with another set)")
    which.add_argument("--second", dest="pair_set", action="store_const", const=2, help="--pair-set 2")
    pairs_parser.add_argument("--out", required=True)
    run_parser = sub.add_parser("run", help="register the pairs with some methods")
    run_parser.add_argument("--pairs", required=True)
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--methods", required=True)
    run_parser.add_argument("--threads", type=int, default=1)
    run_parser.add_argument("--limit", type=int, default=0)
    run_parser.add_argument("--only", default="", help="comma-separated pair numbers (0-based) to run")
    run_parser.add_argument("--weights", help="fmsam weights file (default: the bundled model)")
    run_parser.add_argument("--label", help="suffix for the fmsam methods' name, e.g. adam -> fmsam-fast[adam]")
    run_parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                            help="an fmsam module's numeric constant for this run's fmsam rows (a diagnostic, as "
                                 "benchmark.py's --set); needs --label")
    run_parser.add_argument("--slice-refinement", choices=SLICE_REFINEMENT, default=DEFAULT_SLICE_REFINEMENT,
                            help="fmsam register --slice-refinement (give --label too, e.g. slices)")
    report_parser = sub.add_parser("report", help="summary table of a results folder")
    report_parser.add_argument("--out", required=True)
    report_parser.add_argument("--also", nargs="*", help="more results folders to merge in")
    args = parser.parse_args()
    if args.command == "pairs" and bool(args.splits) != bool(args.role):
        parser.error("pairs: --role goes with --splits (and only with it)")
    {"pairs": pairs_command, "run": run_command, "report": report_command}[args.command](args)


if __name__ == "__main__":
    main()
