"""When does the affine's reverse direction win? Per pair, on the engine's path (read, reorient,
normalise, block-average): ``alignment_score`` of the forward affine, of the inverse of the reverse
one, of the moments-centred start and of the identity; zero and foreground fractions of both images;
label Dice through the forward and through the reversed affine; seconds of the forward one.

Usage: python3 Testing/Benchmarks/affine_directions.py OUT.csv NAME=pairs.csv ...
(columns ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``, relative to the pairs file)."""
import csv, os, sys, time
import SimpleITK as sitk
from fmsam import fields, pipeline, prealign
from fmsam.metrics import labels_in_both, mean_dice
handle = open(sys.argv[1], "w", newline="")
out = csv.writer(handle)
out.writerow(["set", "pair", "s_fwd", "s_rev", "s_centred", "s_identity", "zero_fixed", "zero_moving", "fg_fixed", "fg_moving", "dice_fwd", "dice_rev", "t_fwd"])
for item in sys.argv[2:]:
    name, path = item.split("=")
    base = os.path.dirname(os.path.abspath(path))
    for n, row in enumerate(csv.DictReader(open(path))):
        row = {k: os.path.join(base, v) for k, v in row.items()}
        inputs = pipeline.read_inputs(row["fixed"], row["moving"], row["fixed_labels"], row["moving_labels"])
        pipeline.normalise_inputs(inputs, "auto", pipeline.TRAINING_ORIENTATION)
        f, m, s = prealign.affine_inputs(inputs.fixed_normalised, inputs.moving_normalised)
        tr = prealign._Progress(None, 1)
        t = time.perf_counter()
        fwd, centred = prealign._rigid_then_affine(f, m, 60, 0.10, tr, s)
        t_fwd = time.perf_counter() - t
        rev, _ = prealign._rigid_then_affine(m, f, 60, 0.10, tr, s)
        rev = sitk.AffineTransform(rev.GetInverse())
        sc = [prealign.alignment_score(f, m, x) for x in (fwd, rev, centred, sitk.AffineTransform(3))]
        fa, ma = sitk.GetArrayViewFromImage(inputs.fixed_normalised), sitk.GetArrayViewFromImage(inputs.moving_normalised)
        fl = sitk.GetArrayFromImage(inputs.fixed_labels); ml = sitk.GetArrayFromImage(inputs.moving_labels)
        labels = labels_in_both(fl, ml)
        d = [mean_dice(fl, sitk.GetArrayFromImage(fields.resample(inputs.moving_labels, inputs.fixed, x, nearest=True)), labels) for x in (fwd, rev)]
        out.writerow([name, n] + ["%.4f" % v for v in sc] + ["%.3f" % (fa == 0).mean(), "%.3f" % (ma == 0).mean(), "%.3f" % (fa > prealign.FOREGROUND).mean(), "%.3f" % (ma > prealign.FOREGROUND).mean(), "%.4f" % d[0], "%.4f" % d[1], "%.3f" % t_fwd])
        handle.flush()
