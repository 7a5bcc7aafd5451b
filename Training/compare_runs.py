"""Compare training runs from their ``log.csv``: validation figures at equal steps and at equal
wall-clock, and seconds per step by pair source.

    python Training/compare_runs.py Training/runs/i15_adam_mix Training/runs/i15_sam05_mix

For every run: each validation row (step, cumulative training seconds, brain Dice, abdomen organ
Dice, cardiac LNCC; selection sets only) and the median seconds per step of each pair source. Then,
for the first run against each other one: the other run's last validation row, and the first run's
validation row at about the same cumulative seconds (its last row whose seconds do not exceed the
other's), the "equal wall-clock" comparison. Seconds are the trainer's per-step times (validation
and data loading excluded) on a shared machine, so they carry its load; the median per source says
how noisy they are.
"""
import argparse
import csv
import os
import statistics

FIGURES = (("val_dice", "brain Dice"), ("val_abdomen_dice", "abdomen Dice"), ("val_cardiac_lncc", "cardiac LNCC"))


def read_run(folder):
    """``(validation rows with 'elapsed' added, {source: [seconds per step]})`` of a run folder."""
    with open(os.path.join(folder, "log.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    elapsed, validations, per_source = 0.0, [], {}
    for row in rows:
        elapsed += float(row["seconds"])
        per_source.setdefault(row.get("source") or "brain", []).append(float(row["seconds"]))
        if row.get("val_dice"):
            validations.append(dict(row, elapsed=elapsed))
    return validations, per_source


def describe(row):
    values = ["%s %s" % (name, row.get(key) or "-") for key, name in FIGURES]
    return "step %5s  %7.0f s  %s" % (row["step"], row["elapsed"], "  ".join(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    args = parser.parse_args(argv)
    runs = {folder: read_run(folder) for folder in args.runs}
    for folder, (validations, per_source) in runs.items():
        print("%s" % folder)
        for row in validations:
            print("  " + describe(row))
        print("  seconds per step, median (steps): " + ", ".join(
            "%s %.2f (%d)" % (source, statistics.median(times), len(times)) for source, times in sorted(per_source.items())))
    first = args.runs[0]
    for other in args.runs[1:]:
        if not runs[other][0] or not runs[first][0]:
            continue
        last = runs[other][0][-1]
        matching = [row for row in runs[first][0] if row["elapsed"] <= last["elapsed"]]
        print("equal wall-clock: %s at %s" % (other, describe(last)))
        print("                  %s at %s" % (first, describe(matching[-1]) if matching else "no validation yet"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
