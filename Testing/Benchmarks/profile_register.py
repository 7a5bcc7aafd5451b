"""Where the time of one ``fmsam register`` goes (issue 16): imports, each stage, each output file.

Runs the command's own steps in one process, as ``fmsam register`` runs them, and records for each
part the wall-clock seconds and the CPU seconds of the process (user + system, all threads). On an
idle machine the wall clock is what a user waits; on a machine other jobs share, the CPU seconds
are the steadier figure (a one-threaded part's CPU seconds are its idle wall clock).

    python3 Testing/Benchmarks/profile_register.py FIXED MOVING [--mode fast] [--repeat 3] \
        [--picture docs/images/speed_profile.png] [--csv out/profile.csv]

The first repeat includes the imports (PyTorch about 1 s) and the weights' loading; later ones reuse
them (a long-running process such as Slicer's engine pays them once per run anyway: the engine is a
new process each time). Every repeat writes all outputs into a fresh temporary folder.
"""
import argparse
import csv
import os
import sys
import tempfile
import time

#: Run from a checkout: the checkout's engine, not an installed copy.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Logic"))


class Clock:
    """Wall and CPU seconds of named parts, in order."""

    def __init__(self):
        self.parts = []
        self._name, self._wall, self._cpu = None, None, None

    def start(self, name):
        self.stop()
        self._name, self._wall, self._cpu = name, time.perf_counter(), time.process_time()

    def stop(self):
        if self._name is not None:
            self.parts.append((self._name, time.perf_counter() - self._wall, time.process_time() - self._cpu))
            self._name = None


def profile_once(args, clock):
    clock.start("imports")
    from fmsam.pipeline import register
    from fmsam.options import io_steps_of

    def progress(stage, fraction):
        if clock._name != "stage " + stage:
            clock.start("stage " + stage)

    import SimpleITK as sitk

    from fmsam import fields, transform_file
    from fmsam.overview import write_overview

    result = register(args.fixed, args.moving, io_steps=io_steps_of(args.mode), device="cpu", progress=progress)
    with tempfile.TemporaryDirectory() as folder:
        clock.start("write transform.h5")
        transform_file.write_transform(result.transform, os.path.join(folder, "transform.h5"))
        clock.start("write inverse_transform.h5")
        transform_file.write_transform(result.inverse_transform, os.path.join(folder, "inverse_transform.h5"))
        clock.start("write warped.nii.gz")
        sitk.WriteImage(result.warped, os.path.join(folder, "warped.nii.gz"), useCompression=True)
        clock.start("write jacobian.nii.gz")
        sitk.WriteImage(result.jacobian, os.path.join(folder, "jacobian.nii.gz"), useCompression=True)
        clock.start("write overview.png")
        moving_on_fixed = fields.resample(sitk.ReadImage(args.moving), result.fixed, sitk.Transform())
        write_overview(os.path.join(folder, "overview.png"), result.fixed, moving_on_fixed, result.warped,
                       result.jacobian, result.report)
        clock.stop()
    return result.report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("--mode", default="fast", choices=("fast", "accurate"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--picture", help="bar chart of the last repeat (PNG)")
    parser.add_argument("--csv", help="every part of every repeat")
    args = parser.parse_args(argv)
    rows = []
    for repeat in range(args.repeat):
        clock = Clock()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        profile_once(args, clock)
        total = (time.perf_counter() - start_wall, time.process_time() - start_cpu)
        print("repeat %d: %.2f s wall, %.2f s CPU" % (repeat, total[0], total[1]))
        for name, wall, cpu in clock.parts:
            print("  %-28s %6.3f s wall %6.3f s CPU" % (name, wall, cpu))
            rows.append({"repeat": repeat, "part": name, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4)})
        rows.append({"repeat": repeat, "part": "total", "wall_s": round(total[0], 4), "cpu_s": round(total[1], 4)})
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["repeat", "part", "wall_s", "cpu_s"])
            writer.writeheader()
            writer.writerows(rows)
    if args.picture:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        last = [row for row in rows if row["repeat"] == args.repeat - 1 and row["part"] != "total"]
        figure, axis = plt.subplots(figsize=(7, 0.35 * len(last) + 1.2))
        names = [row["part"] for row in last][::-1]
        axis.barh(names, [row["wall_s"] for row in last][::-1], color="#4c72b0", label="wall clock")
        axis.barh(names, [row["cpu_s"] for row in last][::-1], color="none", edgecolor="#dd8452",
                  label="CPU (all threads)")
        axis.set_xlabel("seconds")
        axis.set_title("fmsam register --mode %s, one pair (repeat %d of %d)" % (args.mode, args.repeat, args.repeat))
        axis.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(args.picture, dpi=110, metadata={"Software": None})


if __name__ == "__main__":
    main()
