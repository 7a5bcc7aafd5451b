"""Summary of a `speed_versions.sh` log: per engine version, the whole command's mean, min and max
seconds and the mean seconds of the affine and network stages and of the registration (report.json).
Usage: python3 Testing/Benchmarks/speed_summary.py LOG"""
import re, sys, collections, numpy as np
w = collections.defaultdict(list); st = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) whole ([\d.]+) s", line)
    if m: w[m.group(1)].append(float(m.group(2)))
    m = re.match(r"\s+(\S+) ([\d.]+) ([\d.]+) ([\d.]+)", line)
    if m: st[m.group(1)].append([float(m.group(i)) for i in (2, 3, 4)])
if not w:
    sys.exit("speed_summary: no 'whole' lines in %s" % sys.argv[1])
for k in w:
    a = np.array(st[k]).mean(0)
    print("%-22s n=%d whole mean %.2f (%.2f-%.2f)  affine %.2f network %.2f registration %.2f" % (k, len(w[k]), np.mean(w[k]), min(w[k]), max(w[k]), *a))
