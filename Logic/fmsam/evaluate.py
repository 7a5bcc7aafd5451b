"""Registering a list of pairs and reporting Dice, folding and time for each (``fmsam evaluate``).

Every pair's files are checked before the first registration: a bad pair stops the batch before
any work, with a message naming its line in the CSV and its files. A pair whose registration fails
(e.g. a non-finite result) stops the batch the same way. The results CSV is written when every pair
is done, all at once, so a failed batch leaves none.
"""
import csv
import io
import os
import sys

import numpy as np

from .errors import InputError, RegistrationError
from .options import DEFAULT_SLICE_REFINEMENT

COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels")
RESULT_FIELDS = ("fixed", "moving", "dice_affine", "dice_after", "folding_percent", "jacobian_min",
                 "jacobian_max", "log_jacobian_std", "seconds", "device", "slices_refined", "io_steps_run")


def read_pairs(path):
    """Rows of a pairs CSV; relative paths are taken relative to the CSV's folder. Each row also has
    ``line`` (its line number in the file) and ``number`` (1 for the first pair)."""
    if not os.path.isfile(path):
        raise InputError("pairs file not found: %s" % path)
    try:
        rows = _read_rows(path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError("pairs file %s is not a CSV text file (%s)" % (path, error)) from None
    if not rows:
        raise InputError("pairs file %s has no pairs" % path)
    return rows


def _read_rows(path):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS[:2] if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError("pairs file %s lacks the column(s) %s (needs %s)"
                             % (path, ", ".join(missing), ", ".join(COLUMNS)))
        rows = []
        for row in reader:
            pair = {c: os.path.join(base, row[c]) if row.get(c) else None for c in COLUMNS}
            pair.update(line=reader.line_num, number=len(rows) + 1)
            rows.append(pair)
    return rows


def _where(pairs_csv, pair, total):
    return "pairs file %s, line %d (pair %d of %d: fixed %s, moving %s)" % (
        pairs_csv, pair["line"], pair["number"], total, pair["fixed"], pair["moving"])


def check_pair(pair):
    """Read and check a pair's images and label maps as :func:`fmsam.register` will."""
    from .imageio import load_label_map_on_grid, load_scalar_volume

    for role in ("fixed", "moving"):
        if pair[role] is None:
            raise InputError("the %s column is empty" % role)
        image = load_scalar_volume(pair[role], role + " image")
        if pair[role + "_labels"] is not None:
            load_label_map_on_grid(pair[role + "_labels"], image, pair[role], role)


def _check_options(pairs_csv, out_csv, device, io_steps, prealign, contrast_matching, slice_refinement):
    from .arguments import check_choice, check_device, check_flag, check_io_steps
    from .options import CONTRAST_MATCHING, SLICE_REFINEMENT
    from .outputs import check_output_file

    check_output_file(out_csv, inputs=(pairs_csv,))
    check_io_steps(io_steps)
    check_flag(prealign, "prealign")
    check_choice(contrast_matching, "contrast_matching", CONTRAST_MATCHING)
    check_choice(slice_refinement, "slice_refinement", SLICE_REFINEMENT)
    check_device(device)


def evaluate_pairs(pairs_csv, out_csv, device="auto", io_steps=0, weights=None, prealign=True,
                   show_progress=True, contrast_matching="auto", allow_unverified=False,
                   slice_refinement=DEFAULT_SLICE_REFINEMENT):
    """Register every pair, write one result row each to ``out_csv``, print the means; returns rows.

    Raises :class:`InputError` (a bad option, weights file or pair, before any registration) or
    :class:`RegistrationError` (a pair's registration failed); the message names the pair's line
    in ``pairs_csv`` and its files, and nothing is written.
    """
    from .imageio import write_atomically
    from .pipeline import register
    from .weights import load_model

    _check_options(pairs_csv, out_csv, device, io_steps, prealign, contrast_matching, slice_refinement)
    pairs = read_pairs(pairs_csv)
    for pair in pairs:
        try:
            check_pair(pair)
        except InputError as error:
            raise InputError("%s: %s" % (_where(pairs_csv, pair, len(pairs)), error)) from None
    model = load_model(weights, allow_unverified=allow_unverified)
    results = []
    for pair in pairs:
        try:
            report = register(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"],
                              prealign=prealign, io_steps=io_steps, device=device, model=model,
                              contrast_matching=contrast_matching, slice_refinement=slice_refinement).report
        except (InputError, RegistrationError) as error:
            _end_progress_line(show_progress and results)
            raise type(error)("%s: %s" % (_where(pairs_csv, pair, len(pairs)), error)) from None
        except BaseException:
            _end_progress_line(show_progress and results)
            raise
        results.append(_result_row(pair, report))
        if show_progress:
            _progress_bar(len(results), len(pairs), results[-1])
    write_atomically(lambda path: _write_rows(path, results), out_csv)
    summary = summarise(results)
    print("mean over %d pairs: " % len(results)
          + ", ".join("%s %.4f" % (k, v) for k, v in summary.items()))
    return results


def _result_row(pair, report):
    return {"fixed": os.path.basename(pair["fixed"]), "moving": os.path.basename(pair["moving"]),
            "dice_affine": report.get("dice_affine", ""), "dice_after": report.get("dice_after", ""),
            "folding_percent": report["folding_percent"], "jacobian_min": report["jacobian_min"],
            "jacobian_max": report["jacobian_max"], "log_jacobian_std": report["log_jacobian_std"],
            "seconds": report["seconds"]["total"], "device": report["device"],
            "slices_refined": report["slice_refinement"]["applied"], "io_steps_run": report["io_steps_run"]}


def _write_rows(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, RESULT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "w", newline="") as handle:
        handle.write(text.getvalue())


def _end_progress_line(drawn):
    """A message after the progress bar starts on its own line."""
    if drawn:
        sys.stderr.write("\n")
        sys.stderr.flush()


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
