"""Summary of a `speed_versions.sh` log: per engine version, the whole command's mean, min and max
seconds and the mean seconds of the affine and network stages and of the registration (report.json).

    python3 Testing/Benchmarks/speed_summary.py LOG
"""
import collections
import re
import sys

import numpy as np

#: ``/usr/bin/time``'s line: ``VERSION whole SECONDS s peak KB KB``.
WHOLE = re.compile(r"(\S+) whole ([\d.]+) s")
#: report.json's stage seconds: ``  VERSION AFFINE NETWORK TOTAL``.
STAGES = re.compile(r"\s+(\S+) ([\d.]+) ([\d.]+) ([\d.]+)")


def read_log(lines):
    """``(whole, stages)``: per version, the whole command's seconds and the [affine, network,
    registration] seconds of each run, in the log's order."""
    whole, stages = collections.defaultdict(list), collections.defaultdict(list)
    for line in lines:
        found = WHOLE.match(line)
        if found:
            whole[found.group(1)].append(float(found.group(2)))
        found = STAGES.match(line)
        if found:
            stages[found.group(1)].append([float(found.group(i)) for i in (2, 3, 4)])
    return whole, stages


def main(path):
    with open(path) as handle:
        whole, stages = read_log(handle)
    if not whole:
        sys.exit("speed_summary: no 'whole' lines in %s" % path)
    for version, seconds in whole.items():
        affine, network, registration = np.array(stages[version]).mean(0)
        print("%-22s n=%d whole mean %.2f (%.2f-%.2f)  affine %.2f network %.2f registration %.2f" % (
            version, len(seconds), np.mean(seconds), min(seconds), max(seconds), affine, network, registration))


if __name__ == "__main__":
    main(sys.argv[1])
