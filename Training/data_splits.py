"""Which subjects of each data source train, select and report (``Testing/Benchmarks/data_splits.json``).

Three roles, never mixed:

* ``training``: what the trainer draws its pairs from;
* ``selection``: what runs, settings and checkpoints are chosen on (the trainer's validation);
* ``report``: what published figures are measured on, never used to choose anything.

The JSON file is the record; :func:`make_splits` is how it was made, so a test can check that the
file is what the rule gives (and a changed rule shows as a failing test, not a silent new split).

    from data_splits import load_splits
    splits = load_splits()                       # the committed file
    splits["cardiac"]["training"]                # [105, 107, ...] (MyoPS patient IDs, int)
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS_FILE = os.path.join(HERE, "..", "Testing", "Benchmarks", "data_splits.json")
ROLES = ("training", "selection", "report")
#: Seed of the abdomen shuffle (the issue number).
ABDOMEN_SEED = 15


def load_splits(path=SPLITS_FILE):
    """The split file as a dict ``{source: {"training": [...], "selection": [...], "report": [...],
    ...}}``; raises ``ValueError`` when a subject has two roles in one source."""
    with open(path) as handle:
        splits = json.load(handle)
    for source, entry in splits.items():
        if not isinstance(entry, dict) or "training" not in entry:
            continue
        seen = {}
        for role in ROLES:
            for subject in entry.get(role, []):
                if subject in seen:
                    raise ValueError("%s: subject %r is both %s and %s" % (source, subject, seen[subject], role))
                seen[subject] = role
    return splits


def _read_ids(path):
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def cardiac_split(cardiac_selection, cardiac_report_issue14):
    """Issue 14's 8 selection patients stay selection; its 32 report patients, in ID order, go
    alternately to training (1st, 3rd, ...) and report (2nd, 4th, ...): 16 + 16, both spanning the
    two ID ranges (101-125, 201-215)."""
    ordered = sorted(int(p) for p in cardiac_report_issue14)
    return {"training": ordered[0::2], "selection": sorted(int(p) for p in cardiac_selection),
            "report": ordered[1::2]}


def abdomen_split(map_ids, seed=ABDOMEN_SEED, report=6, selection=4):
    """The maps (IDs as strings, e.g. '0001') shuffled with ``random.Random(seed)``: the first
    ``report`` report, the next ``selection`` selection, the rest training (each list sorted)."""
    shuffled = sorted(map_ids)
    random.Random(seed).shuffle(shuffled)
    return {"training": sorted(shuffled[report + selection:]),
            "selection": sorted(shuffled[report:report + selection]),
            "report": sorted(shuffled[:report])}


def make_splits(data_dir, issue14_split):
    """The split of every source, from the data folder (``../shared/data``) and issue 14's cardiac
    split (a dict with ``selection`` and ``report`` patient IDs)."""
    abdomen_ids = sorted(name[:-len(".nii.gz")] for name in os.listdir(os.path.join(data_dir, "abdomen_labels"))
                         if name.endswith(".nii.gz"))
    return {
        "ixi": {"training": _read_ids(os.path.join(data_dir, "ixi", "train.txt")),
                "selection": _read_ids(os.path.join(data_dir, "ixi", "val.txt")),
                "report": []},
        "cardiac": cardiac_split(issue14_split["selection"], issue14_split["report"]),
        "abdomen": abdomen_split(abdomen_ids),
        "oasis_pair": {"training": [], "selection": [], "report": ["image_A", "image_B"]},
    }
