"""Registering a list of pairs and reporting Dice, folding and time for each (``fmsam evaluate``)."""
import csv
import os
import sys

import numpy as np

from .errors import InputError

COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels")
RESULT_FIELDS = ("fixed", "moving", "dice_affine", "dice_after", "folding_percent", "jacobian_min",
                 "jacobian_max", "log_jacobian_std", "seconds", "device")


def read_pairs(path):
    """Rows of a pairs CSV; relative paths are taken relative to the CSV's folder."""
    if not os.path.isfile(path):
        raise InputError("pairs file not found: %s" % path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS[:2] if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError("pairs file %s lacks the column(s) %s (needs %s)"
                             % (path, ", ".join(missing), ", ".join(COLUMNS)))
        rows = []
        for row in reader:
            rows.append({c: os.path.join(base, row[c]) if row.get(c) else None for c in COLUMNS})
    if not rows:
        raise InputError("pairs file %s has no pairs" % path)
    return rows


def evaluate_pairs(pairs_csv, out_csv, device="auto", io_steps=0, weights=None, prealign=True,
                   show_progress=True, contrast_matching="auto", allow_unverified=False):
    """Register every pair, write one result row each to ``out_csv``, print the means; returns rows."""
    from .pipeline import register
    from .weights import load_model

    pairs = read_pairs(pairs_csv)
    model = load_model(weights, allow_unverified=allow_unverified)
    results = []
    with open(out_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULT_FIELDS)
        writer.writeheader()
        for number, pair in enumerate(pairs, 1):
            result = register(pair["fixed"], pair["moving"], pair["fixed_labels"],
                              pair["moving_labels"], prealign=prealign, io_steps=io_steps,
                              device=device, model=model, contrast_matching=contrast_matching).report
            row = {"fixed": os.path.basename(pair["fixed"]), "moving": os.path.basename(pair["moving"]),
                   "dice_affine": result.get("dice_affine", ""), "dice_after": result.get("dice_after", ""),
                   "folding_percent": result["folding_percent"], "jacobian_min": result["jacobian_min"],
                   "jacobian_max": result["jacobian_max"],
                   "log_jacobian_std": result["log_jacobian_std"],
                   "seconds": result["seconds"]["total"], "device": result["device"]}
            writer.writerow(row)
            handle.flush()
            results.append(row)
            if show_progress:
                _progress_bar(number, len(pairs), row)
    summary = summarise(results)
    print("mean over %d pairs: " % len(results)
          + ", ".join("%s %.4f" % (k, v) for k, v in summary.items()))
    return results


def summarise(rows):
    summary = {}
    for key in ("dice_affine", "dice_after", "folding_percent", "seconds"):
        values = [float(r[key]) for r in rows if r[key] != ""]
        if values:
            summary[key] = float(np.mean(values))
    return summary


def _progress_bar(done, total, row):
    width = 30
    filled = int(width * done / total)
    dice = " Dice %.3f -> %.3f" % (row["dice_affine"], row["dice_after"]) if row["dice_after"] != "" else ""
    sys.stderr.write("\r[%s%s] %d/%d%s  %.1f s  " % ("#" * filled, "." * (width - filled), done, total,
                                                    dice, row["seconds"]))
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
