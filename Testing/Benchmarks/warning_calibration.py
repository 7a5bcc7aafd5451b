"""Calibration of the failure warning (``fmsam.quality``): per pair, the mutual information of the
fixed image with the affinely aligned and the registered moving image as ``fmsam.register`` reports
it (``mi_affine``, ``mi_registered``), whether it warned, and the cardiac benchmark's NMI (identity,
affine, registered) to tell a run that worked from one that did not.

Sets: the first 10 IXI val pairs, their thick-slice versions, thick + gamma, thick + inverted (made by
``make_unfamiliar.py --limit 10`` into UNFAMILIAR), the OASIS pair both ways, the thick inverted pairs
with contrast matching off (the failure the warning is for), and the cardiac selection pairs
(``cardiac_benchmark.py pairs --set selection``), cross-sequence ones also with matching off.
Fast mode, bundled model, defaults otherwise; one thread. Rows are appended to OUT (CSV)::

    python3 Testing/Benchmarks/warning_calibration.py --unfamiliar out/unfamiliar \\
        --cardiac-pairs out/cardiac/selection_pairs.csv --out out/bench/warning_calibration.csv
"""
import argparse
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "Logic"))
sys.path.insert(0, HERE)

import SimpleITK as sitk  # noqa: E402

import cardiac_benchmark  # noqa: E402
from fmsam import fields, pipeline  # noqa: E402
from fmsam.evaluate import read_pairs  # noqa: E402
from fmsam.weights import load_model  # noqa: E402

OASIS = os.path.join(HERE, "..", "..", "..", "shared", "data", "oasis_pair")


def sets(unfamiliar, cardiac_pairs):
    ixi = read_pairs(os.path.join(HERE, "ixi_val_pairs30.csv"))[:10]
    inverted = read_pairs(os.path.join(unfamiliar, "inverted_pairs.csv"))
    gamma = read_pairs(os.path.join(unfamiliar, "gamma_pairs.csv"))
    thick = [{"fixed": row["fixed"], "moving": os.path.join(
        os.path.dirname(row["moving"]), os.path.basename(row["moving"]).replace("_inverted_thick", "_thick"))}
        for row in inverted]  # the moving subject's thick T1 (it is the fixed image of another pair)
    a, b = (os.path.join(OASIS, "image_%s_160x192x144.nii.gz" % name) for name in "AB")
    oasis = [{"fixed": a, "moving": b}, {"fixed": b, "moving": a}]
    cardiac = cardiac_benchmark.read_csv(cardiac_pairs)
    inter = [row for row in cardiac if row["kind"] == "inter"]
    cross = [row for row in cardiac if row["kind"] == "cross"]
    return [("ixi", ixi, "auto"), ("thick", thick, "auto"), ("gamma", gamma, "auto"),
            ("inverted", inverted, "auto"), ("oasis", oasis, "auto"), ("inverted_unmatched", inverted, "off"),
            ("cardiac_inter", inter, "auto"), ("cardiac_cross", cross, "auto"),
            ("cardiac_cross_unmatched", cross, "off")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unfamiliar", default="out/unfamiliar")
    parser.add_argument("--cardiac-pairs", default="out/cardiac/selection_pairs.csv")
    parser.add_argument("--out", default="out/bench/warning_calibration.csv")
    parser.add_argument("--sets", default="", help="comma-separated set names (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="first N pairs of each set")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    model = load_model(None, "cpu")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new_file = not os.path.isfile(args.out)
    with open(args.out, "a", newline="") as handle:
        writer = None
        for name, pairs, matching in sets(args.unfamiliar, args.cardiac_pairs):
            if args.sets and name not in args.sets.split(","):
                continue
            for number, pair in enumerate(pairs[: args.limit or None]):
                result = pipeline.register(pair["fixed"], pair["moving"], device="cpu", model=model,
                                           contrast_matching=matching)
                fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
                moving = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
                identity = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                report = result.report
                row = {"set": name, "pair": number, "fixed": os.path.basename(pair["fixed"]),
                       "moving": os.path.basename(pair["moving"]),
                       "matched": int(report["contrast_matching"]["applied"]),
                       "mi_affine": round(report["mi_affine"], 5), "mi_registered": round(report["mi_registered"], 5),
                       "relative_gain": round(report["mi_registered"] / report["mi_affine"] - 1.0, 4),
                       "warned": int(bool(report["warnings"])),
                       "nmi_identity": round(cardiac_benchmark.nmi_on_fixed(fixed, identity), 5),
                       "nmi_affine": round(cardiac_benchmark.nmi_on_fixed(
                           fixed, fields.resample(moving, fixed, result.affine)), 5),
                       "nmi_registered": round(cardiac_benchmark.nmi_on_fixed(fixed, result.warped), 5)}
                if writer is None:
                    writer = csv.DictWriter(handle, list(row))
                    if new_file:
                        writer.writeheader()
                writer.writerow(row)
                handle.flush()
                print(" ".join("%s=%s" % item for item in row.items()), flush=True)


if __name__ == "__main__":
    main()
