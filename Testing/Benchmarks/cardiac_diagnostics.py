"""Why does demons reach a higher NMI than fmsam on cardiac stacks? Diagnostics, selection pairs only.

MyoPS short-axis stacks (2-6 slices 12-23 mm thick, 0.7 mm in plane) are acquired slice by slice,
each slice in its own breath-hold, so neighbouring slices can be shifted in plane independently.
fmsam's network runs on a grid of cubic voxels (about 2 mm) with the slices interpolated between,
and its field is smooth across slices; ``benchmark.py``'s demons smooths its field by 1.1 mm
physical on every axis (:func:`benchmark.demons_level_settings`), which leaves slices almost
independent, at 0.7 mm in plane. The subcommands measure NMI exactly as
``cardiac_benchmark.py`` does (:func:`cardiac_benchmark.nmi_on_fixed`, fixed grid, fixed foreground):

* ``demons --variant``: ``as-benchmarked`` (the benchmark's demons), ``no-full-resolution`` (its
  last level, at full resolution, dropped; the middle level's iterations raised 40 -> 60), and
  ``slices-mixed`` (the field's smoothing across slices raised to 10 mm, i.e. slices coupled as in
  a smooth 3-D field; in-plane as benchmarked).
* ``slice-refinement``: ``fmsam register`` in fast mode, then each fixed slice's warped image
  refined by its own in-plane displacement (coarse grid ``--coarse`` times the refinement grid's
  spacing, upsampled linearly; the refinement grid is half the stack's in-plane resolution), Adam on
  local NCC in ``--window`` x ``--window`` boxes (signed for same-sequence pairs, squared across
  sequences, as fmsam's instance optimisation chooses) plus ``--regularisation`` times the mean
  squared difference of neighbouring coarse nodes (normalised units). The refined slice is the
  fmsam-warped slice resampled once more (an approximation of resampling the moving image through
  the composed map), so this is a measure of what per-slice freedom is worth, not an output fmsam
  writes. ``min det`` is the least 2-D determinant of the refinement (corners of every cell).
* ``engine-settings --set NAME=VALUE ...``: the engine's own slice refinement (on by default since
  2026-12-04 afternoon) with constants of :mod:`fmsam.slice_refinement` changed in this process
  (``WINDOW``, ``REGULARISATION``, ``SPACING_MM``, ``STEPS``, ...), fast mode, ``fmsam.register``
  in-process; NMI as the benchmark measures it, folding and the least det J on the fixed grid and the
  fold removal's figures (network voxels, rounds, largest change) from the report::

    python3 Testing/Benchmarks/cardiac_benchmark.py pairs --splits Testing/Benchmarks/data_splits.json \\
        --role selection --out out/i15/cardiac_selection_pairs.csv
    python3 Testing/Benchmarks/cardiac_diagnostics.py demons --pairs out/i15/cardiac_selection_pairs.csv \\
        --only 8,9,10,11,12,13,14,15 --variant slices-mixed
    python3 Testing/Benchmarks/cardiac_diagnostics.py slice-refinement --pairs out/i15/cardiac_selection_pairs.csv
    python3 Testing/Benchmarks/cardiac_diagnostics.py engine-settings --pairs out/i15/cardiac_selection_pairs.csv \\
        --only 8,9,10,11,12,13,14,15 --set WINDOW=13

Results: ``docs/training-log.md``, "Session of 2026-12-04".
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402
import cardiac_benchmark  # noqa: E402  (puts this checkout's Logic first on the path)

#: Physical smoothing across slices of the ``slices-mixed`` demons variant, mm.
MIXED_SLICE_SIGMA_MM = 10.0


def demons_variant(variant):
    """Set ``benchmark``'s demons to ``variant`` (see the module docstring); this process only."""
    if variant == "no-full-resolution":
        benchmark.DEMONS_LEVELS = tuple((shrink, 60 if shrink == 2 else iterations)
                                        for shrink, iterations in benchmark.DEMONS_LEVELS if shrink > 1)
    elif variant == "slices-mixed":
        benchmarked = benchmark.demons_level_settings

        def mixed(image, shrink):
            factors, sigmas, step = benchmarked(image, shrink)
            slice_spacing = image.GetSpacing()[2] * factors[2]
            return factors, sigmas[:2] + [max(sigmas[2], MIXED_SLICE_SIGMA_MM / slice_spacing)], step

        benchmark.demons_level_settings = mixed
    elif variant != "as-benchmarked":
        raise SystemExit("unknown variant %r" % variant)


def refine_slice(fixed, moving, raw, args, squared):
    """One slice: ``(raw warped slice refined, least det J of the refinement)``. ``fixed``/``moving``:
    normalised (H, W) float32 arrays (moving already warped by fmsam), ``raw``: the warped slice as
    fmsam wrote it, which the refinement resamples."""
    import torch

    from fmsam.instance_optimisation import adam_steps
    from fmsam.jacobian import grid_determinant
    from fmsam.layers import normalised_to_voxels, resize, warp
    from fmsam.losses import local_ncc_loss
    from fmsam.slice_refinement import node_roughness, without_slice_displacement

    def as_volume(array):  # (H, W) -> (1, 1, 1, H, W): one plane, so every 3-D operation acts in plane
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None, None]

    full = tuple(fixed.shape)
    half = (1, max(2, full[0] // 2), max(2, full[1] // 2))
    fixed_half, moving_half = resize(as_volume(fixed), half), resize(as_volume(moving), half)
    coarse = (1, max(2, half[1] // args.coarse), max(2, half[2] // args.coarse))
    in_plane = torch.zeros((1, 2) + coarse, requires_grad=True)   # x, y; no displacement across slices
    optimiser = torch.optim.Adam([in_plane], lr=args.learning_rate)

    def loss_now():
        warped = warp(moving_half, without_slice_displacement(in_plane, half), padding_mode="border")
        return (local_ncc_loss(fixed_half, warped, (1, args.window, args.window), squared=squared)
                + args.regularisation * node_roughness(in_plane))

    adam_steps(loss_now, optimiser, args.steps)
    with torch.no_grad():
        field = without_slice_displacement(in_plane, (1,) + full)
        refined = warp(as_volume(raw), field)[0, 0, 0].numpy()
        least = float(grid_determinant(normalised_to_voxels(field), "corners").min())
    return refined, least


def slice_refinement(args):
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for number, pair in selected(args):
        code, _, warped, _ = cardiac_benchmark.run_fmsam(pair, args.threads, 0)
        if code:
            raise SystemExit("fmsam register failed on pair %d" % number)
        fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
        fixed_n, warped_n = (cardiac_benchmark.normalised_array(image) for image in (fixed, warped))
        raw = sitk.GetArrayFromImage(warped)
        refined, least = np.empty_like(raw), []
        for plane in range(raw.shape[0]):
            refined[plane], det = refine_slice(fixed_n[plane], warped_n[plane], raw[plane], args,
                                               squared=pair["kind"] == "cross")
            least.append(det)
        image = sitk.GetImageFromArray(refined)
        image.CopyInformation(fixed)
        rows.append((pair["kind"], cardiac_benchmark.nmi_on_fixed(fixed, warped),
                     cardiac_benchmark.nmi_on_fixed(fixed, image)))
        print("%03d %-5s NMI fast %.5f, refined per slice %.5f, min det %.3f"
              % ((number,) + rows[-1] + (min(least),)), flush=True)
    for kind in ("inter", "cross"):
        values = [row[1:] for row in rows if row[0] == kind]
        if values:
            print("%s: %d pairs, mean NMI fast %.4f, refined %.4f" % ((kind, len(values)) + tuple(np.mean(values, axis=0))))


def demons(args):
    import SimpleITK as sitk

    demons_variant(args.variant)
    values = []
    for number, pair in selected(args):
        code, _, warped, field = cardiac_benchmark.run_demons(pair, args.threads)
        if code:
            raise SystemExit("demons failed on pair %d" % number)
        fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
        fold, least = cardiac_benchmark.folding(field, fixed)
        values.append(cardiac_benchmark.nmi_on_fixed(fixed, warped))
        print("%03d %-5s demons %s NMI %.5f folding %.4f %% min det %.3f"
              % (number, pair["kind"], args.variant, values[-1], fold, least), flush=True)
    print("demons %s: %d pairs, mean NMI %.4f" % (args.variant, len(values), np.mean(values)))


def engine_settings(settings):
    """Set constants of :mod:`fmsam.slice_refinement` from ``NAME=VALUE`` strings (each value of its
    constant's type), in this process; returns them as a dict (:func:`benchmark.engine_constants`)."""
    return benchmark.engine_constants(settings, "slice_refinement")


def engine(args):
    import SimpleITK as sitk
    import torch

    from fmsam.pipeline import register

    torch.set_num_threads(args.threads)
    changed = engine_settings(args.set)
    values = {"inter": [], "cross": []}
    for number, pair in selected(args):
        result = register(pair["fixed"], pair["moving"], device="cpu")
        fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
        warped = sitk.Cast(result.warped, sitk.sitkFloat32)
        values[pair["kind"]].append(cardiac_benchmark.nmi_on_fixed(fixed, warped))
        report = result.report
        print("%03d %-5s %s NMI %.5f folding %.4f %% min det J %.3f refined %s unfolded %d voxels in %d rounds "
              "(largest change %.2f voxels)" % (
                  number, pair["kind"], changed, values[pair["kind"]][-1], report["folding_percent"],
                  report["jacobian_min"], report["slice_refinement"]["applied"], report["unfold_voxels"],
                  report["unfold_rounds"], report["unfold_max_change_voxels"]), flush=True)
    for kind, found in values.items():
        if found:
            print("%s: %d pairs, mean NMI %.4f with %s" % (kind, len(found), np.mean(found), changed))


def selected(args):
    """``(number, pair)`` of the pairs ``--only`` names (0-based), or of every pair, the pairs file read once."""
    pairs = cardiac_benchmark.read_csv(args.pairs)
    numbers = [int(n) for n in args.only.split(",")] if args.only else range(len(pairs))
    return [(number, pairs[number]) for number in numbers]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demons", "slice-refinement", "engine-settings"):
        command = sub.add_parser(name)
        command.add_argument("--pairs", required=True, help="cardiac_benchmark.py pairs output (selection)")
        command.add_argument("--only", default="", help="comma-separated pair numbers (0-based)")
        command.add_argument("--threads", type=int, default=2)
        if name == "demons":
            command.add_argument("--variant", default="as-benchmarked",
                                 choices=("as-benchmarked", "no-full-resolution", "slices-mixed"))
        elif name == "engine-settings":
            command.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                                 help="a constant of fmsam.slice_refinement, e.g. WINDOW=13 (repeatable)")
        else:  # the prototype's own settings (2026-12-04 morning), not the engine's of today
            command.add_argument("--coarse", type=int, default=4)
            command.add_argument("--window", type=int, default=9)
            command.add_argument("--steps", type=int, default=100)
            command.add_argument("--regularisation", type=float, default=1000.0)
            command.add_argument("--learning-rate", type=float, default=0.01)
    args = parser.parse_args()
    {"demons": demons, "slice-refinement": slice_refinement, "engine-settings": engine}[args.command](args)


if __name__ == "__main__":
    main()
